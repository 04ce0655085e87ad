"""Inputs formed again in backward instead of saved.

To get dA, an adapter needs its input x in backward, so LoRA keeps every adapted layer's input.
The frozen model does not: where x is a fresh tensor made by a cheap elementwise step from
tensors that autograd keeps anyway (the norm output ``w ⊙ (h · rstd)`` from ``h`` and ``rstd``;
down_proj's input ``act(g) ⊙ u`` from ``act(g)`` and ``u``), keeping x costs a whole ``(N, in)``
tensor that the frozen model never holds.

A producer (``runlora.layers.recompute``) marks such an x with a ``Remake``: a function and the
tensors it forms x from. The ops (``lora_linear``, ``fused_lora_linear``) then save those
tensors, which share their storage with what autograd saves for the producer's own backward,
instead of x, and call the function in backward. The result is bitwise the forward's x: the
same operations on the same tensors.

A mark is used only while it still describes x: x is unchanged since it was marked (its version
counter), and x requires grad (else autograd keeps nothing for the producer and the remake's
tensors would cost what x costs, or more). Under ``torch.compile`` the ops save x.

Several ops often read one marked x (q_proj, k_proj and v_proj read one norm output; gate_proj
and up_proj another). Each op that saves the remake's tensors claims it in forward, and in
backward the first of them forms x and the others take that same tensor: x is formed once per
backward, not once per op, and let go after the last claimant's backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["Remake", "mark_remake", "remake_of"]

_ATTR = "_runlora_remake"


class Remake:
    """How to form a tensor again: ``fn(*tensors, *args)`` returns it, bitwise.

    ``tensors`` are saved for backward by the op that uses the remake (so autograd checks them
    for in-place changes), ``args`` are plain Python values, ``version`` is the marked tensor's
    version counter when it was marked.
    """

    __slots__ = ("fn", "tensors", "args", "version", "claims", "_formed", "_formed_from")

    def __init__(
        self, fn: Callable[..., Tensor], tensors: tuple[Tensor, ...], args: tuple, version: int
    ) -> None:
        self.fn, self.tensors, self.args, self.version = fn, tensors, args, version
        self.claims = 0  # ops whose backward will still ask for the tensor
        self._formed: Tensor | None = None  # the tensor formed by the first of them
        self._formed_from: tuple | None = None

    def __call__(self, *tensors: Tensor) -> Tensor:
        """The tensor again, from ``tensors`` (``self.tensors`` as backward unpacks them)."""
        return self.fn(*tensors, *self.args)

    def claim(self) -> None:
        """An op saved this remake's tensors and will ``take`` the tensor in its backward."""
        self.claims += 1

    def take(self, *tensors: Tensor) -> Tensor:
        """The tensor again, for one claimant's backward: formed from ``tensors`` by the first
        claimant and handed to the others while they still have a claim, then let go. A call
        with other tensors (or more calls than claims, as a second backward of a retained graph
        makes) forms it anew."""
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        formed = self._formed if key == self._formed_from else None
        if formed is None:
            formed = self(*tensors)
        self.claims -= 1
        if self.claims > 0:
            self._formed, self._formed_from = formed, key
        else:
            self._formed = self._formed_from = None
        return formed

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        return f"Remake({name}, {len(self.tensors)} tensors)"


def mark_remake(x: Tensor, fn: Callable[..., Tensor], tensors: tuple, args: tuple = ()) -> Tensor:
    """Mark ``x`` as ``fn(*tensors, *args)``, formed again in backward by the ops; returns ``x``.

    The caller guarantees that ``fn(*tensors, *args)`` returns x bitwise, and that autograd keeps
    ``tensors`` for backward anyway (else the remake saves nothing). Not under
    ``torch.compile``: a traced graph keeps no Python attributes on its tensors.
    """
    if not torch.compiler.is_compiling():
        setattr(x, _ATTR, Remake(fn, tuple(tensors), tuple(args), x._version))
    return x


def remake_of(x: Tensor) -> Remake | None:
    """``x``'s remake if the ops may save its tensors instead of x, else None."""
    if torch.compiler.is_compiling():
        return None
    remake = getattr(x, _ATTR, None)
    if remake is None:
        return None
    if x._version != remake.version or not x.requires_grad or not torch.is_grad_enabled():
        return None
    return remake

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
and up_proj another). Each op that saves the remake's tensors claims its ``Recipe`` in forward,
and in a backward the first of them forms x and the others take that same tensor: x is formed
once per backward, not once per op, and let go after the last claimant's backward (or when the
backward ends).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["Remake", "Recipe", "mark_remake", "remake_of"]

_ATTR = "_runlora_remake"


class Remake:
    """The mark on a tensor x: the tensors x is formed from, and its ``Recipe``.

    ``tensors`` are saved for backward by each op that reads x (so autograd checks them for
    in-place changes), ``version`` is x's version counter when it was marked. The ops' autograd
    contexts keep only the recipe (``claim``), so nothing of the forward outlives the graph's
    saved tensors through them.
    """

    __slots__ = ("tensors", "version", "recipe")

    def __init__(
        self, fn: Callable[..., Tensor], tensors: tuple[Tensor, ...], args: tuple, version: int
    ) -> None:
        self.tensors, self.version = tensors, version
        self.recipe = Recipe(fn, args)

    def __call__(self, *tensors: Tensor) -> Tensor:
        """x again, from ``tensors`` (``self.tensors`` as backward unpacks them)."""
        return self.recipe(*tensors)

    def claim(self) -> Recipe:
        """An op saved ``self.tensors`` and will ``take`` x in its backward: its recipe. A
        forward run inside a backward (a checkpoint's recompute, whose graph only lends its
        saved tensors to the nodes of the first forward) does not count."""
        if torch._C._current_graph_task_id() == -1:
            self.recipe.claims += 1
        return self.recipe

    def __repr__(self) -> str:
        return f"Remake({self.recipe.name}, {len(self.tensors)} tensors)"


class Recipe:
    """How x is formed again, ``fn(*tensors, *args)`` bitwise, shared by the ops that read x.

    In a backward (without ``create_graph``, not compiled) the first claimant forms x and the
    others take that same tensor while they still have a claim; it is let go after the last
    claim, or else when that backward ends (a partial backward, or a checkpointed recompute that
    claimed again, leaves claims that never come; a backward that raises keeps it until the next
    backward through the graph ends, or the graph is freed).
    """

    __slots__ = ("fn", "args", "claims", "_formed", "_formed_from", "_release_task")

    def __init__(self, fn: Callable[..., Tensor], args: tuple) -> None:
        self.fn, self.args = fn, args
        self.claims = 0  # ops whose backward will still ask for x
        self._formed: Tensor | None = None  # x as the first of them formed it
        self._formed_from: tuple | None = None
        self._release_task = -1  # the backward whose end lets x go

    @property
    def name(self) -> str:
        return getattr(self.fn, "__qualname__", repr(self.fn))

    def __call__(self, *tensors: Tensor) -> Tensor:
        return self.fn(*tensors, *self.args)

    def take(self, *tensors: Tensor) -> Tensor:
        """x again, for one claimant's backward, formed from ``tensors`` (its saved tensors) or
        taken from an earlier claimant that formed it from the very same ones."""
        self.claims -= 1
        task = torch._C._current_graph_task_id()
        if torch.is_grad_enabled() or task == -1 or torch.compiler.is_compiling():
            # create_graph (x needs its graph), outside a backward, or compiled autograd
            return self(*tensors)
        key = tuple(None if t is None else (t.data_ptr(), t._version) for t in tensors)
        formed = self._formed if key == self._formed_from else None
        if formed is None:
            formed = self(*tensors)
        if self.claims > 0:
            self._formed, self._formed_from = formed, key
            if self._release_task != task:  # once per backward (one that raised never ends)
                self._release_task = task
                torch.autograd.Variable._execution_engine.queue_callback(self._release)
        else:
            self._formed = self._formed_from = None
        return formed

    def _release(self) -> None:
        """At the end of the backward that cached x: let it go whatever claims are left."""
        self._formed = self._formed_from = None
        self._release_task = -1

    def __repr__(self) -> str:
        return f"Recipe({self.name}, {self.claims} claims)"


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

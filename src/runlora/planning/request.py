"""One planning request: what a plan is chosen for, spelled once.

A ``PlanRequest`` is a ``Problem`` (one layer call's shape and gradient flags, see
``runlora.ops.variants``) plus how the plan is chosen (``criterion``) and what it will run on
(``dtype``, ``device``). The planner's in-process memo and its on-disk cache are keyed by it
(``cache_key``), and the ranks of a distributed job exchange it as ``to_dict()``.

Planning assumes a trainable adapter: ``Problem.needs_lora_grad`` is always True in a request.
No caller of the planner can know cheaply, before a call, that the adapter is frozen (the layers
plan from shapes and ``x.requires_grad``), and a frozen adapter runs any plan exactly, so the flag
is not part of a request or its key.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..ops.checks import dropout_probability, positive_int
from ..ops.variants import Problem
from .cache import device_key
from .criteria import known_criterion

__all__ = ["PlanRequest", "bucket_tokens"]

_SIZES = ("n_tokens", "in_features", "out_features", "r")
_FLAGS = ("needs_input_grad", "bias", "dropout", "quantized")
_KEYS = (*_SIZES, "criterion", *_FLAGS, "dtype", "device")


def bucket_tokens(n_tokens: int) -> int:
    """The token-count bucket a plan is shared over: N rounded up to the next of four steps per
    power of two (…, 256, 320, 384, 448, 512, 640, …). Exact below 64 tokens.

    Which order wins changes only where N crosses a ratio of in, out and r, so a plan made at the
    bucket's top holds for every N in it to within a few percent of the cost, and a new sequence
    length costs no new planning in the hot path.
    """
    if n_tokens <= 64:
        return n_tokens
    top = 1 << (n_tokens - 1).bit_length()  # next power of two >= n
    step = top // 8
    return -(-n_tokens // step) * step


def _device_name(device: torch.device | str | None) -> str:
    """``device`` as a string with its index where it has one (``"cpu"``, ``"cuda:0"``)."""
    if device is None:
        return "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device must be a torch.device or a name such as 'cpu' or 'cuda:0', got {device!r}"
        ) from err
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())  # where a tensor on "cuda" goes
    return str(dev)


@dataclass(frozen=True)
class PlanRequest:
    """What one plan is chosen for. Frozen and hashable: equal requests get one plan.

    Attributes:
        problem: the layer call (N, in, out, r, whether dX is needed, bias, dropout > 0,
            quantized base). ``needs_lora_grad`` must be True; ``bias_grad`` is stored False (the
            bias gradient is a sum over tokens, which no order changes).
        criterion: a key of ``runlora.planning.criteria.CRITERIA``.
        dtype: the dtype the op computes in (None is read as float32).
        device: where it runs, normalised to a string (``"cpu"``, ``"cuda:0"``; None is
            ``"cpu"``, ``"cuda"`` gets the current device's index).

    Build one from ``plan_layer``'s arguments with ``PlanRequest.for_call``.
    """

    problem: Problem
    criterion: str = "flops"
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not isinstance(self.problem, Problem):
            raise TypeError(
                f"problem must be a runlora.ops.Problem, got {type(self.problem).__name__}; "
                "build a request from sizes with PlanRequest.for_call"
            )
        if not self.problem.needs_lora_grad:
            raise ValueError(
                "plans are made for trainable adapters (needs_lora_grad=True); a frozen adapter "
                "runs any plan exactly, so plan it as trainable"
            )
        known_criterion(self.criterion)
        dtype = torch.float32 if self.dtype is None else self.dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {self.dtype!r}")
        if self.problem.bias_grad:
            object.__setattr__(self, "problem", replace(self.problem, bias_grad=False))
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "device", _device_name(self.device))

    @classmethod
    def for_call(
        cls,
        n_tokens: int,
        in_features: int,
        out_features: int,
        r: int,
        *,
        criterion: str = "flops",
        needs_input_grad: bool = True,
        bias: bool = False,
        dropout: float = 0.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        quantized: bool = False,
    ) -> PlanRequest:
        """The request of one layer call, from ``plan_layer``'s arguments (see there).

        ``dropout`` is the LoRA dropout probability, checked to lie in [0, 1); the request keeps
        only whether it is > 0 (which rules out the merged orders): the plan does not depend on p.
        """
        positive_int("n_tokens", n_tokens)  # Problem checks in_features, out_features and r
        p = dropout_probability("dropout", dropout)
        problem = Problem(
            n_tokens,
            in_features,
            out_features,
            r,
            needs_input_grad=bool(needs_input_grad),
            bias=bool(bias),
            dropout=p > 0.0,
            quantized=bool(quantized),
        )
        return cls(problem, criterion, dtype, device)

    def bucketed(self) -> PlanRequest:
        """This request with N rounded up to its bucket (``bucket_tokens``): what the hot path
        plans, so that every N of a bucket shares one plan."""
        n = bucket_tokens(self.problem.n)
        if n == self.problem.n:
            return self
        return replace(self, problem=replace(self.problem, n=n))

    def cache_key(self) -> str:
        """The request's key in the on-disk plan cache: device model, dtype, torch version
        (``cache.device_key``), criterion, shape and flags. The device's index is not in it:
        GPUs of one model share their plans."""
        p = self.problem
        return (
            f"{device_key(self.device, self.dtype)}|{self.criterion}|n{p.n}"
            f"|{p.in_features}x{p.out_features}|r{p.r}|dx{int(p.needs_input_grad)}"
            f"|bias{int(p.bias)}|drop{int(p.dropout)}|q{int(p.quantized)}"
        )

    def to_dict(self) -> dict:
        """The request as JSON-able plain values (``from_dict`` reads it back), e.g. to send it
        to the other ranks of a job."""
        p = self.problem
        return {
            "n_tokens": p.n,
            "in_features": p.in_features,
            "out_features": p.out_features,
            "r": p.r,
            "criterion": self.criterion,
            "needs_input_grad": p.needs_input_grad,
            "bias": p.bias,
            "dropout": p.dropout,
            "quantized": p.quantized,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": self.device,
        }

    @classmethod
    def from_dict(cls, d: dict) -> PlanRequest:
        """The request ``to_dict`` wrote; ``ValueError`` for a dict that is not one."""
        if not isinstance(d, dict) or set(d) != set(_KEYS):
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"a PlanRequest dict has the keys {', '.join(_KEYS)}; got {got}")
        for name in _FLAGS:
            if not isinstance(d[name], bool):
                raise ValueError(f"{name} must be a bool, got {d[name]!r}")
        dtype = getattr(torch, d["dtype"], None) if isinstance(d["dtype"], str) else None
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype must name a torch dtype ('bfloat16'), got {d['dtype']!r}")
        positive_int("n_tokens", d["n_tokens"])
        problem = Problem(
            d["n_tokens"],
            d["in_features"],
            d["out_features"],
            d["r"],
            **{name: d[name] for name in _FLAGS},
        )
        return cls(problem, d["criterion"], dtype, d["device"])

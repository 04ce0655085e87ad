"""Shared test fixtures: a fixed seed, a reference LoRA written with plain autograd, input
builders and a dtype-aware comparison against an fp64 reference.

The comparison bound: every output and gradient element of the LoRA op is a sum of products of
the inputs. Evaluating the same reference on ``|inputs|`` (and ``|dY|``, ``|s|``) gives, per
element, the sum of the absolute values of those products, which grows with the reduction size.
Each rounding of an intermediate (X Aᵀ, Z, G, a merged weight, the output) perturbs an element by
at most ``eps / 2`` of that sum, and sums of rounding errors grow like the square root of their
length, so ``ERROR_SLACK * eps * bound`` is a tolerance scaled to the dtype and the reduction
size (the worst case seen over random shapes is about a fifth of it). A wrong formula (a missing
scaling, the wrong dropout mask, a transposed operand) moves elements by ``O(|value|)``: far
outside it in fp32/fp64, and outside it in bf16/fp16 unless the error is under a few percent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from runlora import lora_linear

SEED = 16
#: rounding stages allowed between the fp64 reference and the op, in units of eps · bound.
ERROR_SLACK = 8.0


@pytest.fixture(autouse=True)
def seed() -> int:
    """Every test starts from the same RNG state."""
    torch.manual_seed(SEED)
    return SEED


def reference_lora(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    bias: Tensor | None = None,
    *,
    scaling: float = 1.0,
    keep: Tensor | None = None,
    dropout: float = 0.0,
) -> Tensor:
    """PEFT's LoRA by plain autograd; ``keep`` (broadcastable to x) is an explicit dropout mask."""
    lx = x if keep is None else x * keep / (1.0 - dropout)
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(lx, lora_a), lora_b)


def leaf_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """The shape of the storage a tensor of ``shape`` is viewed from in ``layout``."""
    if layout == "transposed":
        return tuple(reversed(shape))
    if layout == "sliced":
        return (*shape[:-1], 2 * shape[-1])
    if layout == "expanded" and len(shape) >= 2:
        return (*shape[:-2], 1, shape[-1])
    return tuple(shape)


def in_layout(leaf: Tensor, shape: tuple[int, ...], layout: str) -> Tensor:
    """A view of ``leaf`` of ``shape``: the leaf itself ("contiguous"), all dims reversed
    ("transposed"), every other element of the last dim ("sliced"), or the second-to-last dim
    broadcast with stride 0 ("expanded")."""
    if layout == "contiguous":
        return leaf
    if layout == "transposed":
        return leaf.permute(*reversed(range(leaf.dim())))
    if layout == "sliced":
        return leaf[..., 1::2]
    if layout == "expanded":
        return leaf.expand(shape)
    raise ValueError(f"unknown layout {layout!r}")


@dataclass
class LoraInputs:
    """The op's inputs. ``x_leaf`` is what gradients are taken of; x is a view of it of shape
    ``x_shape``, non-contiguous unless ``x_layout`` is "contiguous" (see ``in_layout``)."""

    x_leaf: Tensor
    weight: Tensor
    lora_a: Tensor
    lora_b: Tensor
    bias: Tensor | None
    scaling: float
    x_shape: tuple[int, ...]
    x_layout: str = "contiguous"

    @property
    def x(self) -> Tensor:
        return in_layout(self.x_leaf, self.x_shape, self.x_layout)

    def leaves(self) -> dict[str, Tensor]:
        """The tensors that require grad, by name (x, lora_A, lora_B, bias)."""
        named = {"x": self.x_leaf, "lora_A": self.lora_a, "lora_B": self.lora_b, "bias": self.bias}
        return {k: t for k, t in named.items() if t is not None and t.requires_grad}

    def converted(self, dtype: torch.dtype, *, absolute: bool = False) -> LoraInputs:
        """Fresh leaves in ``dtype`` (absolute values if asked), keeping requires_grad."""

        def conv(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            c = t.detach().to(dtype)
            c = c.abs() if absolute else c.clone()
            return c.requires_grad_(t.requires_grad)

        return replace(
            self,
            x_leaf=conv(self.x_leaf),
            weight=conv(self.weight),
            lora_a=conv(self.lora_a),
            lora_b=conv(self.lora_b),
            bias=conv(self.bias),
            scaling=abs(self.scaling) if absolute else self.scaling,
        )

    def run(self, **kwargs) -> Tensor:
        return lora_linear(
            self.x, self.weight, self.lora_a, self.lora_b, self.bias, scaling=self.scaling, **kwargs
        )

    def run_reference(self, **kwargs) -> Tensor:
        return reference_lora(
            self.x, self.weight, self.lora_a, self.lora_b, self.bias, scaling=self.scaling, **kwargs
        )


def make_lora_inputs(
    x_shape: tuple[int, ...],
    out_features: int,
    r: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    x_layout: str = "contiguous",
    x_grad: bool = True,
    a_grad: bool = True,
    b_grad: bool = True,
    bias: str | None = "trainable",
    scaling: float = 0.5,
) -> LoraInputs:
    """Random inputs of unit-order entries, drawn in fp64 and rounded to ``dtype`` (so the fp64
    reference sees exactly the values the op sees). lora_B is non-zero, unlike at init."""
    in_features = x_shape[-1]

    def rand(*shape: int, scale: float = 1.0, grad: bool = False) -> Tensor:
        t = (torch.randn(shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    return LoraInputs(
        x_leaf=rand(*leaf_shape(x_shape, x_layout), grad=x_grad),
        weight=rand(out_features, in_features, scale=in_features**-0.5),
        lora_a=rand(r, in_features, scale=in_features**-0.5, grad=a_grad),
        lora_b=rand(out_features, r, scale=r**-0.5, grad=b_grad),
        bias=None if bias is None else rand(out_features, grad=bias == "trainable"),
        scaling=scaling,
        x_shape=tuple(x_shape),
        x_layout=x_layout,
    )


def _grads(y: Tensor, leaves: dict[str, Tensor], dy: Tensor) -> dict[str, Tensor]:
    if not leaves:
        return {}
    return dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), dy), strict=True))


def assert_within_bound(
    name: str,
    actual: Tensor,
    expected: Tensor,
    bound: Tensor,
    dtype: torch.dtype,
    context: str = "",
) -> None:
    """``|actual - expected| <= ERROR_SLACK * eps(dtype) * bound`` elementwise (fp64)."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == dtype, f"{name}: dtype {actual.dtype}, expected {dtype}"
    info = torch.finfo(dtype)
    err = (actual.detach().double().cpu() - expected.detach().cpu()).abs()
    tol = ERROR_SLACK * info.eps * bound.detach().cpu() + info.tiny
    worst = (err / tol).max().item() if err.numel() else 0.0
    assert worst <= 1.0, (
        f"{name} ({dtype}{context}) is off the fp64 reference by {worst:.3g}x the tolerance "
        f"(max abs error {err.max().item():.3g})"
    )


def assert_matches_reference(
    inputs: LoraInputs,
    *,
    keep: Tensor | None = None,
    dropout: float = 0.0,
    dy_layout: str = "contiguous",
    **op_kwargs,
) -> Tensor:
    """Run the op on ``inputs`` with ``dropout`` (forward, and backward with a random dY) and
    check Y and every gradient against the fp64 reference. ``keep``: the dropout mask the
    reference applies, None for none. ``dy_layout``: how dY, the gradient that reaches the op's
    backward, is laid out (see ``in_layout``). Returns the op's output."""
    dtype = inputs.x_leaf.dtype
    y = inputs.run(dropout=dropout, **op_kwargs)
    expected_shape = (*inputs.x.shape[:-1], inputs.weight.shape[0])
    assert y.shape == expected_shape and y.dtype == dtype
    dy_leaf = torch.randn(leaf_shape(y.shape, dy_layout), dtype=torch.float64).to(y)
    dy = in_layout(dy_leaf, y.shape, dy_layout)
    leaves = inputs.leaves()
    assert y.requires_grad == bool(leaves)
    grads = _grads(y, leaves, dy)

    ref_kwargs = {"keep": None if keep is None else keep.double(), "dropout": dropout}
    ref = inputs.converted(torch.float64)
    y_ref = ref.run_reference(**ref_kwargs)
    grads_ref = _grads(y_ref, ref.leaves(), dy.double())
    absolute = inputs.converted(torch.float64, absolute=True)
    y_bound = absolute.run_reference(**ref_kwargs)
    grads_bound = _grads(y_bound, absolute.leaves(), dy.double().abs())

    context = "".join(f", {k}={v!r}" for k, v in {"dropout": dropout, **op_kwargs}.items())
    assert_within_bound("Y", y, y_ref, y_bound, dtype, context)
    for name, grad in grads.items():
        assert_within_bound(f"d{name}", grad, grads_ref[name], grads_bound[name], dtype, context)
    return y


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tiny products on one thread: on a loaded 2-core machine, OpenMP's
    threads wait on each other for tens of ms per tiny product, and one thread sums in a fixed
    order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def lora_inputs() -> Callable[..., LoraInputs]:
    """Factory: ``lora_inputs(x_shape, out_features, r, dtype=..., x_layout=..., ...)``."""
    return make_lora_inputs


@pytest.fixture(scope="session")
def check_reference() -> Callable[..., Tensor]:
    """``check_reference(inputs, plan=..., ...)``: the op against the fp64 reference."""
    return assert_matches_reference


def count_op_calls(monkeypatch) -> list:
    """From now on, one entry per call of runlora's op from a layer (``runlora.layers.layer``'s
    ``lora_linear``, or ``dora_linear`` for a DoRA adapter; a fused call of a shared-input
    group counts once per layer): how the tests see that a layer ran runlora's op, not PEFT's
    forward."""
    import runlora.layers.groups
    import runlora.layers.layer

    calls: list = []
    for name in ("lora_linear", "dora_linear"):
        real = getattr(runlora.layers.layer, name)
        monkeypatch.setattr(
            runlora.layers.layer,
            name,
            lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k),
        )
    real_fused = runlora.layers.groups.fused_lora_linear

    def fused(x, weights, *a, **k):  # a fused call runs the op of each of its layers
        calls.extend([1] * len(weights))
        return real_fused(x, weights, *a, **k)

    monkeypatch.setattr(runlora.layers.groups, "fused_lora_linear", fused)
    return calls

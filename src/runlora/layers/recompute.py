"""LoRA inputs recomputed in backward instead of saved: the modules that mark them.

The op saves its input x for dA unless x carries a ``runlora.ops.remake.Remake``. ``enable``
gives the modules whose outputs feed LoRA layers in transformer blocks a forward that does
exactly what their own forward does and marks the output:

- ``rms_norm``: a Llama-style RMSNorm (``weight ⊙ (h · rsqrt(mean(h²) + eps))`` with ``h`` the
  input in fp32): its output, the input of q/k/v and gate/up, is formed again from ``h`` and
  ``rstd`` ``(N, 1)``, which the norm's own backward keeps.
- ``layer_norm``: an ``nn.LayerNorm``: formed again from its input, which its backward keeps.
- ``gated_mlp``: a module with ``gate_proj``, ``up_proj``, ``down_proj`` and ``act_fn`` computing
  ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``: down_proj's input ``act(g) ⊙ u`` is formed
  again from ``act(g)`` and ``u``, which the product's backward keeps.
- ``gate_up_mlp``: the same MLP with the two projections fused into one ``gate_up_proj``
  (Phi-3 and its likes: ``g, u = gate_up_proj(x).chunk(2, -1)``, ``activation_fn`` or
  ``act_fn``): down_proj's input formed again from ``act(g)`` and the ``u`` half, both kept by
  the product's backward anyway.

Modules are found by structure, and each candidate is probed before it is switched: its own
class's forward and runlora's are run on a random input (a copy of a norm with a random weight;
an MLP's forward with stand-in projections), and must agree bitwise, else the module keeps its
forward (``Report.skipped`` says why). Gemma's ``(1 + weight)`` norm and MLPs with dropout or
another order of operations are left as they are.

Under gradient checkpointing (a ``gradient_checkpointing`` flag on an enclosing module, as
transformers sets it) nothing is marked: the checkpoint recomputes the block anyway, and
forming x a second time would only cost time.
"""

from __future__ import annotations

import copy
import types
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..ops.remake import mark_remake

__all__ = ["enable", "disable", "Report", "recomputed_modules"]

_EPS_ATTRS = ("variance_epsilon", "eps")
# module -> weakrefs of its enclosing modules that have a gradient_checkpointing flag
_OWNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _rms_remake(h: Tensor, rstd: Tensor, weight: Tensor, dtype: torch.dtype) -> Tensor:
    return weight * (h * rstd).to(dtype)


def _rms_forward(module: nn.Module, eps_attr: str, hidden_states: Tensor) -> Tensor:
    dtype = hidden_states.dtype
    h = hidden_states.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    rstd = torch.rsqrt(variance + getattr(module, eps_attr))
    y = _rms_remake(h, rstd, module.weight, dtype)
    if h.requires_grad and _marking(module):
        mark_remake(y, _rms_remake, (h, rstd, module.weight), (dtype,))
    return y


def _layer_norm_remake(x: Tensor, weight, bias, shape, eps: float) -> Tensor:
    return torch.nn.functional.layer_norm(x, shape, weight, bias, eps)


def _layer_norm_forward(module: nn.LayerNorm, attr: str, x: Tensor) -> Tensor:
    # weight and bias go with the saved tensors: autograd then checks them for in-place changes
    tensors, args = (x, module.weight, module.bias), (module.normalized_shape, module.eps)
    y = _layer_norm_remake(*tensors, *args)
    if x.requires_grad and _marking(module):
        mark_remake(y, _layer_norm_remake, tensors, args)
    return y


def _mlp_remake(a: Tensor, u: Tensor) -> Tensor:
    return a * u


def _gated_mlp_forward(module: nn.Module, eps_attr: str, x: Tensor) -> Tensor:
    a = module.act_fn(module.gate_proj(x))
    u = module.up_proj(x)
    h = _mlp_remake(a, u)
    if a.requires_grad and u.requires_grad and _marking(module):
        mark_remake(h, _mlp_remake, (a, u))
    return module.down_proj(h)


def _gate_up_mlp_forward(module: nn.Module, act_attr: str, x: Tensor) -> Tensor:
    gate, u = module.gate_up_proj(x).chunk(2, dim=-1)
    a = getattr(module, act_attr)(gate)
    h = _mlp_remake(a, u)
    if a.requires_grad and u.requires_grad and _marking(module):
        mark_remake(h, _mlp_remake, (a, u))
    return module.down_proj(h)


_FORWARDS = {
    "rms_norm": _rms_forward,
    "layer_norm": _layer_norm_forward,
    "gated_mlp": _gated_mlp_forward,
    "gate_up_mlp": _gate_up_mlp_forward,
}


def _marking(module: nn.Module) -> bool:
    """False under gradient checkpointing of an enclosing module (or in eager-less tracing)."""
    if torch.compiler.is_compiling():
        return False
    for ref in _OWNERS.get(module, ()):
        owner = ref()
        if owner is not None and owner.training and getattr(owner, "gradient_checkpointing", 0):
            return False
    return True


class _Forward:
    """A switched module's ``forward``: runlora's marking forward of ``kind`` (picklable, and
    deep-copied with its module); ``attr`` names the norm's epsilon or the MLP's activation."""

    def __init__(self, module: nn.Module, kind: str, attr: str = "") -> None:
        self.module, self.kind, self.attr = module, kind, attr

    def __call__(self, *args, **kwargs) -> Tensor:
        return _FORWARDS[self.kind](self.module, self.attr, *args, **kwargs)

    def __setstate__(self, state: dict) -> None:
        if "eps_attr" in state:  # pickled by runlora 0.3
            state["attr"] = state.pop("eps_attr")
        self.__dict__.update(state)


@dataclass
class Report:
    """What ``enable`` did: ``switched`` maps module names to their kind, ``skipped`` maps the
    names of candidates that keep their forward to why."""

    switched: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        kinds: dict[str, int] = {}
        for kind in self.switched.values():
            kinds[kind] = kinds.get(kind, 0) + 1
        done = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "nothing"
        text = f"LoRA inputs recomputed after: {done}"
        if self.skipped:
            text += f"; {len(self.skipped)} kept their forward: " + "; ".join(
                f"{n} ({why})" for n, why in self.skipped.items()
            )
        return text


def _eps_attr(module: nn.Module) -> str | None:
    for attr in _EPS_ATTRS:
        if isinstance(getattr(module, attr, None), float):
            return attr
    return None


def _candidate(module: nn.Module) -> tuple[str, str] | None:
    """(kind, attribute: the norm's epsilon, the MLP's activation) if ``module`` looks like one
    of the kinds, else None."""
    if type(module).forward is nn.LayerNorm.forward:
        return "layer_norm", ""
    weight = getattr(module, "weight", None)
    if (
        "RMSNorm" in type(module).__name__
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 1
        and getattr(module, "bias", None) is None
        and not any(True for _ in module.children())
    ):
        attr = _eps_attr(module)
        return ("rms_norm", attr) if attr else None
    if all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj")):
        if isinstance(getattr(module, "down_proj", None), nn.Module) and callable(
            getattr(module, "act_fn", None)
        ):
            return "gated_mlp", ""
    if all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_up_proj", "down_proj")):
        acts = [n for n in ("activation_fn", "act_fn") if callable(getattr(module, n, None))]
        if acts:
            return "gate_up_mlp", acts[0]
    return None


def _probe(module: nn.Module, kind: str, attr: str) -> str | None:
    """None if runlora's forward of ``kind`` gives ``module``'s own class forward's output
    bitwise on a random input, else why not (a probe that cannot run: not switched)."""
    try:
        return _run_probe(module, kind, attr)
    except Exception as e:  # noqa: BLE001 - sharded or unusual parameters: leave it alone
        return f"could not be probed ({type(e).__name__}: {e})"


def _run_probe(module: nn.Module, kind: str, attr: str) -> str | None:
    gen = torch.Generator().manual_seed(0)
    if kind == "layer_norm":
        return None  # nn.LayerNorm.forward itself, by _candidate's test
    if kind == "rms_norm":
        weight = module.weight
        if weight.device.type == "meta" or not weight.is_floating_point():
            return f"weight on {weight.device.type}, {weight.dtype}: not probed"
        probe = copy.deepcopy(module)
        x = torch.randn(4, weight.shape[0], generator=gen) * 3
        with torch.no_grad():
            probe.weight.copy_(torch.randn(weight.shape, generator=gen))
            x = x.to(weight.device, weight.dtype)
            try:
                want = type(module).forward(probe, x)
            except Exception as e:  # noqa: BLE001 - any failure means: leave it alone
                return f"its forward failed on a probe: {type(e).__name__}"
            got = _rms_forward(probe, attr, x)
    else:  # an MLP: its forward and runlora's on stand-in projections
        stand_in = types.SimpleNamespace(**{k: v for k, v in vars(module).items() if k[0] != "_"})
        stand_in.training = False
        for name in ("act_fn", "activation_fn"):
            if hasattr(module, name):
                setattr(stand_in, name, getattr(module, name))
        stand_in.gate_proj = lambda t: t * 1.75 - 0.25
        stand_in.up_proj = lambda t: t.flip(-1) + 0.5
        stand_in.gate_up_proj = lambda t: torch.cat((t * 1.75 - 0.25, t.flip(-1) + 0.5), -1)
        stand_in.down_proj = lambda t: t * 0.875 + t.roll(1, -1)
        x = torch.randn(2, 3, 8, generator=gen)
        with torch.no_grad():
            try:
                want = type(module).forward(stand_in, x)
            except Exception as e:  # noqa: BLE001
                return f"its forward does not run on stand-in projections: {type(e).__name__}"
            got = _FORWARDS[kind](stand_in, attr, x)
    if not isinstance(want, Tensor) or want.shape != got.shape or not torch.equal(want, got):
        return f"its forward does not compute what runlora's {kind} does"
    return None


def enable(model: nn.Module, enabled: bool = True) -> Report:
    """Switch the modules of ``model`` that produce LoRA inputs to marking forwards (see the
    module doc), or with ``enabled=False`` give them their own forward back. Idempotent."""
    report = Report()
    owners: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        owners = [(n, m) for n, m in owners if name.startswith(n + ".") or n == ""]
        if hasattr(module, "gradient_checkpointing"):
            owners.append((name, module))
        current = module.__dict__.get("forward")
        if isinstance(current, _Forward):
            if not enabled:
                del module.__dict__["forward"]
            else:
                report.switched[name] = current.kind
            continue
        if not enabled or "forward" in module.__dict__:
            continue  # another library's forward (accelerate hooks): leave it alone
        found = _candidate(module)
        if found is None:
            continue
        kind, attr = found
        why = _probe(module, kind, attr)
        if why is not None:
            report.skipped[name] = why
            continue
        module.__dict__["forward"] = _Forward(module, kind, attr)
        _OWNERS[module] = tuple(weakref.ref(m) for n, m in owners if m is not module)
        report.switched[name] = kind
    return report


def disable(model: nn.Module) -> Report:
    """Give the switched modules of ``model`` their own forward back."""
    return enable(model, enabled=False)


def recomputed_modules(model: nn.Module) -> dict[str, str]:
    """The modules of ``model`` switched by ``enable``, name -> kind."""
    return {
        name: m.__dict__["forward"].kind
        for name, m in model.named_modules()
        if isinstance(m.__dict__.get("forward"), _Forward)
    }

"""Shared-input groups: accelerated LoRA layers that a model calls one after another with the
very same input tensor (q_proj, k_proj, v_proj on the norm output; gate_proj, up_proj) run as
one ``fused_lora_linear`` call, which reads that input once per stacked product.

Groups are found by what the model does, not by class or module names:

- Discovery. While a layer has no group yet, each of its plain calls is recorded (per thread):
  layers called in a row with the same ``x`` object (same version, same shape) form a chain,
  and a chain ends at the first call that does not continue it. A chain of two or more layers
  becomes a ``SharedInputGroup`` (in call order); a chain of one marks its layer as alone.
  A group found in a forward that autograd records is used once that forward's backward has
  run through the first member's call (after any recompute of gradient checkpointing, which
  must run what the forward ran, each layer alone); otherwise at once.
- Use. From then on, the group's first layer, called with ``x``, runs the fused op for every
  member (each with its own weight, bias, A, B, scaling, dropout and plan, as its own call
  would look them up) where the planner finds that it pays for this call's shapes and plans
  (``runlora.planning.fusion``; else each member runs its own op), returns its own output and
  stashes the others'. The next accelerated
  call takes the stashed output if it is the next member, called with that same ``x`` (same
  object, version, grad mode, adapter and adapter parameter versions); any other call drops the
  stash, and that layer runs as it would have. So an output is consumed once, right after the
  group's call, or never (nothing stale is ever returned, nothing outlives the next call).

Only the plain case joins: one active plain LoRA adapter (no DoRA, no ``lora_bias``, not
merged, adapters enabled, no ``adapter_names``), a dense base (not quantized, not a DTensor
shard) and ``fuse`` on in every member; otherwise each layer runs its own op, as always. Under
``torch.compile`` nothing here runs (each layer traces its own op).

Dropout. The fused op draws each projection's seed in projection order from torch's generator
when the first member is called, as the separate calls would in that order: with nothing random
between the calls (q/k/v, gate/up), the masks are the ones the separate calls draw.

Gradient checkpointing recomputes the block's forward, which calls the members again: the
recompute runs the fused op once, as the first forward did.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import Tensor, nn

from ..ops.fused import fused_lora_linear
from ..ops.fused_variants import FusedProblem
from ..ops.variants import Problem
from ..planning.fusion import Fusion, plan_fusion
from ..planning.request import bucket_tokens

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch without torch.distributed
    DTensor = ()

__all__ = ["SharedInputGroup", "grouped_call", "interrupt", "group_of", "ALONE"]

#: What a layer's ``_runlora_group`` holds when discovery found no sibling for it.
ALONE = "alone"


class SharedInputGroup:
    """Layers that the model calls one after another with the same input, in call order."""

    __slots__ = ("members", "skipped", "fusion", "decisions", "_ready")

    def __init__(self, members: list[nn.Module], ready: _Ready) -> None:
        self.members = tuple(members)
        self.skipped: str | None = None  # why the last call of the first member ran alone
        self.fusion: Fusion | None = None  # the planner's call for the last call's shapes
        self.decisions: dict[tuple, Fusion] = {}  # per call kind (see ``_plan``)
        self._ready = ready

    @property
    def ready(self) -> bool:
        """False until no recompute of the forward that found the group can follow."""
        return self._ready.ready

    def __repr__(self) -> str:
        return f"SharedInputGroup({len(self.members)} layers)"


class _Ready:
    """Whether a group may fuse: once the backward of every recorded forward that ran its
    members alone has run (a recompute of one of those under non-reentrant checkpointing must
    save what that forward saved), counted by hooks on the autograd node of the first member's
    call in each such forward (see ``grouped_call``); at once if none recorded a node."""

    __slots__ = ("ready", "pending")

    def __init__(self) -> None:
        self.ready = False
        self.pending = 0

    def wait_for(self, y: Tensor) -> None:
        """Count the forward whose first-member output is ``y`` (no node: nothing to wait for;
        a recompute inside a backward is not waited for: its node never runs a backward)."""
        if torch._C._current_graph_task_id() != -1:
            return
        if y.grad_fn is None:
            self.ready = self.pending == 0
            return
        self.pending += 1
        y.grad_fn.register_hook(self)

    def __call__(self, grad_inputs, grad_outputs) -> None:
        self.pending -= 1
        if self.pending == 0:
            self.ready = True


class _Stash:
    """The outputs of the members after ``next`` of one fused call, for their own calls."""

    __slots__ = ("x", "version", "grad", "group", "outputs", "names", "versions", "next")

    def __init__(self, x, group, outputs, names, versions) -> None:
        self.x, self.version, self.grad = x, _version(x), torch.is_grad_enabled()
        self.group, self.outputs, self.names, self.versions = group, outputs, names, versions
        self.next = 1

    def take(self, layer: nn.Module, x: Tensor, name: str) -> Tensor | None:
        k = self.next
        if (
            self.group.members[k] is layer
            and x is self.x
            and _version(x) == self.version
            and torch.is_grad_enabled() == self.grad
            and name == self.names[k]
            and _param_versions(layer, name) == self.versions[k]
        ):
            return self.outputs[k]
        return None


class _State(threading.local):
    def __init__(self) -> None:
        self.stash: _Stash | None = None
        self.chain: list[weakref.ref] = []  # weak: a deleted model is not kept alive
        self.chain_key: tuple | None = None  # (weakref to x, version, shape, grad mode)
        self.chain_ready: _Ready | None = None


_STATE = _State()


def _version(t: Tensor) -> int:
    """``t._version``; -1 for an inference tensor, which keeps no version counter."""
    return -1 if t.is_inference() else t._version


def _param_versions(layer: nn.Module, name: str) -> tuple[int, int]:
    return _version(layer.lora_A[name].weight), _version(layer.lora_B[name].weight)


def group_of(layer: nn.Module):
    """The layer's ``SharedInputGroup``, ``ALONE``, or None before discovery saw it."""
    return layer.__dict__.get("_runlora_group")


def _end_chain(state: _State) -> None:
    chain = [m for ref in state.chain if (m := ref()) is not None and group_of(m) is None]
    ready = state.chain_ready
    state.chain, state.chain_key, state.chain_ready = [], None, None
    if len(chain) >= 2:
        group = SharedInputGroup(chain, ready)
        for m in chain:
            m.__dict__["_runlora_group"] = group
    elif chain:
        chain[0].__dict__["_runlora_group"] = ALONE


#: True once any layer has had ``fuse`` set: until then no call needs the bookkeeping below,
#: and a layer's forward skips it (one module attribute read).
ENABLED = False


def enable() -> None:
    """Note that some layer fuses from now on (``LoRAEngine.fuse = True`` calls this)."""
    global ENABLED
    ENABLED = True


def interrupt() -> None:
    """A call that is not a plain grouped one: drop the stash, end the discovery chain. Called
    eagerly only (never under ``torch.compile``)."""
    state = _STATE
    state.stash = None
    if state.chain:
        _end_chain(state)


def _observe(state: _State, layer: nn.Module, x: Tensor, undiscovered: bool) -> bool:
    """Record a call of ``layer`` on ``x``; True if it starts a new chain."""
    key = state.chain_key
    if (
        undiscovered
        and key is not None
        and key[0]() is x
        and key[1] == _version(x)
        and key[2] == x.shape
        and key[3] == torch.is_grad_enabled()
        and all(ref() is not layer for ref in state.chain)
    ):
        state.chain.append(weakref.ref(layer))
        return False
    if state.chain:
        _end_chain(state)
    if group_of(layer) is not None:
        return False
    state.chain = [weakref.ref(layer)]
    state.chain_key = (weakref.ref(x), _version(x), x.shape, torch.is_grad_enabled())
    state.chain_ready = _Ready()
    return True


def _why_alone(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot be a fused member right now, or None if it can."""
    if not layer.fuse:
        return "fuse=False"
    name = layer.plain_adapter()
    if name is None:
        return "not one plain active adapter"
    if layer.dora_magnitude(name) is not None:
        return "a DoRA adapter"
    weight, _, quant = layer.base_weight_args()
    if quant is not None or weight is None:
        return "a quantized base"
    if isinstance(weight, DTensor):
        return "a sharded (DTensor) base weight"
    return None


def _run_group(group: SharedInputGroup, x: Tensor) -> Tensor | None:
    members = group.members
    for m in members:
        why = _why_alone(m)
        if why is not None:
            group.skipped, group.fusion = f"{type(m).__name__} has {why}", None
            return None
    group.skipped = None
    names = [m.plain_adapter() for m in members]
    args = [m.fused_args(x, n) for m, n in zip(members, names, strict=True)]
    weights, biases, lora_as, lora_bs, scalings, dropouts, plans = zip(*args, strict=True)
    group.fusion = fusion = _plan(group, x, weights, biases, lora_as, lora_bs, dropouts, plans)
    if not fusion.fused:
        return None
    ys = fused_lora_linear(
        x,
        weights,
        lora_as,
        lora_bs,
        biases,
        scalings=scalings,
        dropouts=dropouts,
        training=True,  # dropouts are 0 for members outside training
        plans=plans,
    )
    for m, plan in zip(members, plans, strict=True):
        m.note_plan(x, plan)
    versions = [_param_versions(m, n) for m, n in zip(members, names, strict=True)]
    _STATE.stash = _Stash(x, group, ys, names, versions)
    return ys[0]


def _plan(group, x, weights, biases, lora_as, lora_bs, dropouts, plans) -> Fusion:
    """The planner's call (``runlora.planning.fusion``) for this call's shapes and plans, over
    the same token bucket as the members' plans; remembered on the group per call kind."""
    grad = torch.is_grad_enabled()
    n = bucket_tokens(max(1, x.numel() // x.shape[-1]))
    needs_x = grad and x.requires_grad
    pairs = zip(lora_as, lora_bs, strict=True)
    needs_lora = tuple(grad and (a.requires_grad or b.requires_grad) for a, b in pairs)
    bias_grad = tuple(grad and b is not None and b.requires_grad for b in biases)
    ranks = tuple(a.shape[0] for a in lora_as)
    drop = tuple(p > 0.0 for p in dropouts)
    key = (n, needs_x, needs_lora, bias_grad, ranks, drop, plans)
    hit = group.decisions.get(key)
    if hit is not None:
        return hit
    parts = tuple(
        Problem(
            n,
            w.shape[1],
            w.shape[0],
            r,
            needs_input_grad=needs_x,
            needs_lora_grad=lora_grad,
            bias=bias is not None,
            bias_grad=b_grad,
            dropout=d,
        )
        for w, bias, r, d, lora_grad, b_grad in zip(
            weights, biases, ranks, drop, needs_lora, bias_grad, strict=True
        )
    )
    if len(group.decisions) >= 64:
        group.decisions.clear()
    group.decisions[key] = fusion = plan_fusion(FusedProblem(parts), plans)
    return fusion


def grouped_call(layer: nn.Module, x: Tensor, name: str) -> Tensor:
    """A plain call of ``layer`` (its one adapter ``name``) on ``x``, eagerly, ``(..., in)`` ->
    ``(..., out)``: its output taken from the stash, or from a fused call of its group, or from
    its own op (``call_op``)."""
    state = _STATE
    stash = state.stash
    if stash is not None:
        state.stash = None
        y = stash.take(layer, x, name)
        if y is not None:
            stash.next += 1
            if stash.next < len(stash.outputs):
                state.stash = stash
            return y
    group = group_of(layer)
    if group is None and _why_alone(layer) is not None:  # cannot join now: breaks a chain
        if state.chain:
            _end_chain(state)
        return layer.call_op(x, name)[0]
    starts = False
    if group is None or state.chain:
        starts = _observe(state, layer, x, group is None)
        group = group_of(layer)
    first = type(group) is SharedInputGroup and group.members[0] is layer
    if first and group.ready:
        y = _run_group(group, x)
        if y is not None:
            return y
    y = layer.call_op(x, name)[0]
    # The backward of a forward that ran the members alone may recompute it (non-reentrant
    # checkpointing checks that the recompute saves what the forward saved): a group fuses
    # only once every such forward's backward has run.
    if starts:
        state.chain_ready.wait_for(y)
    elif first and not group.ready:
        group._ready.wait_for(y)
    return y


def group_summary(layer: nn.Module, names: dict[int, str]) -> str:
    """What ``runlora.describe`` says of ``layer``'s group: ``"fused with k_proj, v_proj"``, or
    why it runs alone. ``names``: ``id(module) -> name`` for the model's layers."""
    why = _why_alone(layer)
    if why is not None:
        return f"not fused: {why}"
    group = group_of(layer)
    if group is None:
        return "not fused yet: groups are found at the first eager call"
    if type(group) is not SharedInputGroup:
        return "not fused: no other LoRA layer is called with its input"
    own = names.get(id(layer), "")
    prefix = own.rpartition(".")[0] + "." if "." in own else ""

    def short(m: nn.Module) -> str:
        name = names.get(id(m))
        if name is None:
            return f"a {type(m).__name__} outside this model"
        return name[len(prefix) :] if prefix and name.startswith(prefix) else name

    others = ", ".join(short(m) for m in group.members if m is not layer)
    if group.fusion is not None and not group.fusion.fused:
        return f"not fused with {others}: the plan runs them apart ({group.fusion.reason})"
    text = "fused with " + others
    if not group.ready:
        text += " (from the call after the first backward)"
    if group.skipped:
        text += f" (the last call ran each alone: {group.skipped})"
    return text

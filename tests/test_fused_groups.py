"""Shared-input groups (``runlora.layers.groups``): layers a model calls one after another with
the same input run as one ``fused_lora_linear`` call. Against the ungrouped model
(``from_peft(fuse=False)``) and stock PEFT: outputs, loss and every LoRA gradient, with dropout,
bias, ``rank_pattern`` and gradient checkpointing; which op ran; what backward keeps; models
whose layers do not share an input; the stash's lifetime."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import llama, text_batch
from torch import nn

import runlora
import runlora.layers.groups as groups
import runlora.layers.layer
from runlora.planning.fusion import Fusion

peft = pytest.importorskip("peft")

ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BLOCKS = 2  # tiny_models.llama's layers


def config(**kwargs):
    kwargs.setdefault("target_modules", ALL_SEVEN)
    return peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kwargs)


def build(base, cfg):
    """(stock PEFT, runlora grouped, runlora ungrouped), all with the same adapter weights."""
    reference = peft.get_peft_model(copy.deepcopy(base), cfg)
    fused = runlora.from_peft(peft.get_peft_model(copy.deepcopy(base), cfg), fuse=True)
    alone = runlora.from_peft(peft.get_peft_model(copy.deepcopy(base), cfg), fuse=False)
    for model in (fused, alone):
        model.load_state_dict(reference.state_dict())
    for model in (reference, fused, alone):
        model.train()
    return reference, fused, alone


def step(model, batch, seed=0):
    """Loss, logits and the trainable parameters' gradients of one forward and backward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return out.loss.detach(), out.logits.detach(), grads


def assert_same(actual, expected, rtol=1e-5, atol=1e-6):
    (loss_a, logits_a, grads_a), (loss_e, logits_e, grads_e) = actual, expected
    torch.testing.assert_close(loss_a, loss_e, rtol=rtol, atol=atol)
    torch.testing.assert_close(logits_a, logits_e, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_e.keys()
    for name, grad in grads_e.items():
        torch.testing.assert_close(grads_a[name], grad, rtol=rtol, atol=atol, msg=name)


def count_calls(monkeypatch) -> dict[str, int]:
    """Calls of the fused op (from groups) and of the single op (from layers), from now on."""
    calls = {"fused": 0, "single": 0}
    real_fused, real_single = groups.fused_lora_linear, runlora.layers.layer.lora_linear

    def fused(*a, **k):
        calls["fused"] += 1
        return real_fused(*a, **k)

    def single(*a, **k):
        calls["single"] += 1
        return real_single(*a, **k)

    monkeypatch.setattr(groups, "fused_lora_linear", fused)
    monkeypatch.setattr(runlora.layers.layer, "lora_linear", single)
    return calls


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_llama_runs_qkv_and_gate_up_fused_exactly(dropout, monkeypatch):
    reference, fused, alone = build(llama(), config(lora_dropout=dropout))
    batch = text_batch()
    step(fused, batch)  # the first call finds the groups
    calls = count_calls(monkeypatch)
    got = step(fused, batch, seed=1)
    assert calls == {"fused": 2 * BLOCKS, "single": 2 * BLOCKS}  # q/k/v, gate/up; o, down
    # with dropout, the same seed gives the same masks: the fused op draws each projection's
    # seed in projection order, as the separate calls do
    assert_same(got, step(alone, batch, seed=1))
    assert calls == {"fused": 2 * BLOCKS, "single": 9 * BLOCKS}
    if dropout == 0.0:
        assert_same(got, step(reference, batch, seed=1), rtol=1e-4, atol=1e-6)
    rows = {r.name.partition("layers.")[2]: r.detail for r in runlora.describe(fused, file=None)}
    assert rows["0.self_attn.k_proj"].endswith("fused with q_proj, v_proj")
    assert rows["1.mlp.gate_proj"].endswith("fused with up_proj")
    assert rows["0.self_attn.o_proj"].endswith("no other LoRA layer is called with its input")
    assert all("fused" not in r.detail for r in runlora.describe(alone, file=None))
    for mode in (torch.no_grad, torch.inference_mode):  # found at once, used at the next call
        with mode():
            fresh = build(llama(), config(lora_dropout=dropout))[1]
            fresh.load_state_dict(fused.state_dict())
            fresh.eval(), alone.eval()
            expected = alone(**batch).logits
            fresh(**batch)
            calls["fused"] = 0
            torch.testing.assert_close(fresh(**batch).logits, expected, rtol=1e-5, atol=1e-6)
            assert calls["fused"] == 2 * BLOCKS


def test_projections_of_different_ranks_fuse_exactly(monkeypatch):
    cfg = config(rank_pattern={"q_proj": 2, "k_proj": 6, "up_proj": 3}, alpha_pattern={"v_proj": 3})
    reference, fused, alone = build(llama(), cfg)
    batch = text_batch()
    step(fused, batch)
    calls = count_calls(monkeypatch)
    got = step(fused, batch, seed=1)
    assert calls["fused"] == 2 * BLOCKS
    assert_same(got, step(alone, batch, seed=1))
    assert_same(got, step(reference, batch, seed=1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_stays_exact_and_recomputes_each_group_once(reentrant, monkeypatch):
    reference, fused, alone = build(llama(), config(lora_dropout=0.1))
    plain = copy.deepcopy(fused)  # no checkpointing
    for model in (fused, alone):
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": reentrant}
        )
        if reentrant:  # else the first block's input does not require grad, as in training
            model.enable_input_require_grads()
    batch = text_batch()
    step(fused, batch)  # finds the groups; its recompute runs each layer alone, as it did
    step(plain, batch)
    calls = count_calls(monkeypatch)
    got = step(fused, batch, seed=1)
    # the forward, and the recompute of each block in backward: once each
    assert calls == {"fused": 2 * 2 * BLOCKS, "single": 2 * 2 * BLOCKS}
    assert_same(got, step(alone, batch, seed=1))
    assert_same(got, step(plain, batch, seed=1))


class Siblings(nn.Module):
    """Three Linear siblings with bias on one normed input, then one on their sum; or, with
    ``shared=False``, each sibling on its own input."""

    def __init__(self, shared: bool = True) -> None:
        super().__init__()
        self.shared = shared
        self.norm = nn.LayerNorm(16)
        self.a, self.b, self.c = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(16, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        h = self.norm(x)
        if self.shared:
            y = self.a(h) * self.b(h) + self.c(h)
        else:
            y = self.a(h) * self.b(h + 1) + self.c(h * 2)
        return self.out(y)


def siblings(shared: bool = True):
    torch.manual_seed(0)
    base = Siblings(shared)
    cfg = peft.LoraConfig(
        r=3,
        lora_alpha=6,
        init_lora_weights=False,
        target_modules=["a", "b", "c", "out"],
        bias="all",
    )
    reference = peft.get_peft_model(copy.deepcopy(base), cfg)
    ours = runlora.from_peft(peft.get_peft_model(copy.deepcopy(base), cfg), fuse=True)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def always_fuse(monkeypatch) -> None:
    """Fuse whatever the planner would say: the siblings' tiny shapes (N = 2 or 3) move more
    bytes stacked than apart, and these tests are about the stash and readiness."""
    monkeypatch.setattr(groups, "plan_fusion", lambda *a: Fusion(True, "forced by the test"))


def sibling_step(model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("shared", [True, False])
def test_siblings_with_bias_fuse_and_unshared_inputs_fall_back(shared, monkeypatch):
    reference, ours = siblings(shared)
    x = torch.randn(2, 5, 16)
    sibling_step(ours, x)
    calls = count_calls(monkeypatch)
    got, expected = sibling_step(ours, x), sibling_step(reference, x)
    assert calls == ({"fused": 1, "single": 1} if shared else {"fused": 0, "single": 4})
    assert got[2].keys() == expected[2].keys() and any("bias" in n for n in got[2])
    pairs = [*zip(got[:2], expected[:2], strict=True)] + [
        (got[2][n], g) for n, g in expected[2].items()
    ]
    for a, e in pairs:  # fp32 rounding, relative to the tensor's size
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6 * e.abs().max().item())
    rows = {r.name.rsplit(".", 1)[-1]: r.detail for r in runlora.describe(ours, file=None)}
    if shared:
        assert rows["a"].endswith("fused with b, c") and rows["c"].endswith("fused with a, b")
    else:
        assert all(
            d.endswith("no other LoRA layer is called with its input") for d in rows.values()
        )


def test_the_stash_is_taken_once_by_the_next_sibling_or_dropped(monkeypatch):
    """Direct layer calls: an output is stashed only for the very next call of the next member
    with the same, unchanged input and unchanged adapter; anything else runs the layer's op."""
    always_fuse(monkeypatch)
    reference, ours = siblings()
    net, ref = ours.base_model.model, reference.base_model.model
    h = torch.randn(3, 16)
    with torch.no_grad():
        ours(h)  # finds the group a, b, c, usable at once: no backward can recompute this call
        assert isinstance(groups.group_of(net.a), groups.SharedInputGroup)
        assert groups.group_of(net.a).ready

        def expect(layer, ref_layer, x):
            torch.testing.assert_close(layer(x), ref_layer(x), rtol=1e-5, atol=1e-6)

        net.a(h)
        assert groups._STATE.stash is not None
        net.c(h)  # not the next member: the stash goes, c runs its own op
        assert groups._STATE.stash is None
        net.a(h)
        h.add_(1.0)  # the input changed in place
        expect(net.b, ref.b, h)
        net.a(h)
        for model in (net, ref):
            model.b.lora_B["default"].weight.mul_(2.0)  # an optimizer step between the calls
        expect(net.b, ref.b, h)
        net.a(h)
        expect(net.b, ref.b, h)  # taken
        expect(net.c, ref.c, h)  # taken, the stash is then empty
        assert groups._STATE.stash is None
        net.out(torch.randn(3, 8))
        assert groups._STATE.stash is None


def test_a_group_found_in_a_recorded_forward_waits_for_its_backward(monkeypatch):
    """The forward that finds a group ran each layer alone; a recompute of it in backward
    (non-reentrant checkpointing) must too: the group is used once the backward reached x."""
    always_fuse(monkeypatch)
    _, ours = siblings()
    x = torch.randn(2, 16)
    calls = count_calls(monkeypatch)
    first = ours(x).sum()
    group = groups.group_of(ours.base_model.model.a)
    assert isinstance(group, groups.SharedInputGroup) and not group.ready
    detail = runlora.describe(ours, file=None)[0].detail
    assert detail.endswith("fused with b, c (from the call after the first backward)")
    ours(x).sum().backward()  # another forward and backward before the first one's backward
    assert calls["fused"] == 0 and not group.ready
    first.backward()
    assert group.ready
    ours(x)
    assert calls == {"fused": 1, "single": 4 + 4 + 1}


def test_a_member_that_cannot_fuse_runs_the_group_alone_and_describe_says_why(monkeypatch):
    reference, ours = siblings()
    x = torch.randn(2, 5, 16)
    sibling_step(ours, x)
    ours.base_model.model.b.fuse = False
    calls = count_calls(monkeypatch)
    got, expected = sibling_step(ours, x), sibling_step(reference, x)
    assert calls == {"fused": 0, "single": 4}
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    rows = {r.name.rsplit(".", 1)[-1]: r.detail for r in runlora.describe(ours, file=None)}
    assert "the last call ran each alone" in rows["a"] and "fuse=False" in rows["a"]
    assert "fused" not in rows["b"]  # fuse=False: its row says nothing of groups
    with ours.disable_adapter():  # PEFT's own paths in between leave no stash behind
        torch.testing.assert_close(
            ours(x),
            ours.base_model.model.out.base_layer(
                ours.base_model.model.a.base_layer(ours.base_model.model.norm(x))
                * ours.base_model.model.b.base_layer(ours.base_model.model.norm(x))
                + ours.base_model.model.c.base_layer(ours.base_model.model.norm(x))
            ),
        )
    assert groups._STATE.stash is None


def test_from_peft_again_changes_only_settings():
    _, ours = siblings()
    ours(torch.randn(2, 16))
    group = groups.group_of(ours.base_model.model.a)
    runlora.from_peft(ours, fuse=False)
    assert all(not m.fuse for m in (ours.base_model.model.a, ours.base_model.model.out))
    runlora.from_peft(ours)  # fuse=None: the settings stay
    assert not ours.base_model.model.a.fuse
    runlora.from_peft(ours, fuse=True)
    assert ours.base_model.model.a.fuse and groups.group_of(ours.base_model.model.b) is group
    with pytest.raises(TypeError, match="fuse must be True, False or None"):
        runlora.from_peft(ours, fuse="yes")


def _norm_saves(model, batch) -> list[int]:
    """How many times backward keeps each RMSNorm output's storage, in call order."""
    norms = [m for n, m in model.named_modules() if n.endswith("layernorm")]
    outputs: list = []
    # the outputs themselves, kept alive: a freed output's storage could be reused by a tensor
    # saved later, and counted as the output's
    handles = [m.register_forward_hook(lambda m, i, o: outputs.append(o)) for m in norms]
    saved: list = []

    def pack(t):
        saved.append(t.untyped_storage().data_ptr())
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**batch).loss
    finally:
        for h in handles:
            h.remove()
    counts = [saved.count(o.untyped_storage().data_ptr()) for o in outputs]
    loss.backward()
    return counts


def test_backward_keeps_each_norm_output_once_per_group():
    _, fused, alone = build(llama(), config())
    for model in (fused, alone):  # inputs saved, not recomputed (runlora.layers.recompute)
        runlora.recompute_inputs(model, False)
    batch = text_batch()
    step(fused, batch)
    assert _norm_saves(alone, batch) == [3, 2] * BLOCKS  # q, k, v; gate, up
    assert _norm_saves(fused, batch) == [1, 1] * BLOCKS
    for model in (fused, alone):  # recomputed: none but the first (its input needs no grad)
        runlora.recompute_inputs(model)
        assert _norm_saves(model, batch) == [3 if model is alone else 1] + [0] * (2 * BLOCKS - 1)


def test_dora_layers_run_their_own_op_and_describe_says_why(monkeypatch):
    _, ours, _ = build(llama(), config(use_dora=True, target_modules=["q_proj", "k_proj"]))
    calls = count_calls(monkeypatch)
    for _ in range(2):
        ours(**text_batch()).loss.backward()
    assert calls["fused"] == 0
    rows = runlora.describe(ours, file=None)
    assert rows and all(r.detail.endswith("not fused: a DoRA adapter") for r in rows)


def test_two_forwards_before_their_backwards_under_checkpointing(monkeypatch):
    """A group fuses only once the backward of every forward that ran its members alone has
    run: two recorded forwards, then their two backwards, recompute as they ran (non-reentrant
    checkpointing refuses a recompute that saves other tensors), and later steps fuse."""
    reference, fused, _ = build(llama(), config())
    for model in (reference, fused):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = text_batch(seed=3)
    losses = [fused(**batch).loss, fused(**batch).loss]
    for loss in losses:
        loss.backward()
    ours = {n: p.grad.clone() for n, p in fused.named_parameters() if p.requires_grad}
    ref_losses = [reference(**batch).loss, reference(**batch).loss]
    for loss in ref_losses:
        loss.backward()
    for name, p in reference.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
    calls = count_calls(monkeypatch)
    step(fused, batch)
    assert calls["fused"] == 2 * BLOCKS * 2  # now fused (each block's forward and recompute)


def test_a_deleted_model_is_not_kept_alive_by_discovery():
    import gc
    import weakref

    _, fused, _ = build(llama(), config())
    with torch.no_grad():
        fused(**text_batch())
    down = weakref.ref(fused.base_model.model.model.layers[-1].mlp.down_proj)
    del fused
    gc.collect()
    assert down() is None


def test_a_fused_model_loaded_in_a_fresh_process_still_fuses(tmp_path):
    """Grouping is skipped until some layer fuses; a model unpickled elsewhere turns it on."""
    import subprocess
    import sys

    _, fused, _ = build(llama(), config())
    torch.save(fused, tmp_path / "model.pt")
    code = (
        "import sys, torch, runlora, runlora.layers.groups as g\n"
        "assert not g.ENABLED\n"
        f"m = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)\n"
        "assert g.ENABLED and m.base_model.model.model.layers[0].self_attn.q_proj.fuse\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_fused_by_default_where_the_plan_says_it_pays_and_apart_where_not(monkeypatch):
    """A layer switched without ``fuse=`` fuses; the planner runs a group apart where fusing
    moves more bytes (two rows of x, three stacked A copies), and describe says so."""
    base = llama()
    model = runlora.from_peft(peft.get_peft_model(copy.deepcopy(base), config()))
    batch = text_batch()
    step(model, batch)
    calls = count_calls(monkeypatch)
    step(model, batch)
    assert calls == {"fused": 2 * BLOCKS, "single": 2 * BLOCKS}
    rows = {r.name.partition("layers.")[2]: r.detail for r in runlora.describe(model, file=None)}
    assert rows["0.self_attn.k_proj"].endswith("fused with q_proj, v_proj")
    group = groups.group_of(model.base_model.model.model.layers[0].self_attn.q_proj)
    assert group.fusion.fused and "MiB moved fused" in group.fusion.reason

    _, ours = siblings()
    x = torch.randn(2, 16)
    sibling_step(ours, x)  # finds the group
    calls = count_calls(monkeypatch)
    sibling_step(ours, x)
    assert calls == {"fused": 0, "single": 4}
    net = ours.base_model.model
    group = groups.group_of(net.a)
    assert not group.fusion.fused
    rows = {r.name.rpartition(".")[2]: r.detail for r in runlora.describe(ours, file=None)}
    assert "not fused with b, c: the plan runs them apart" in rows["a"]


def _fused_problem(n=1024, d=64, outs=(64, 64, 64), r=4, grad=True):
    from runlora.ops.fused_variants import FusedProblem
    from runlora.ops.variants import Problem

    parts = tuple(Problem(n, d, o, r, needs_input_grad=grad, needs_lora_grad=grad) for o in outs)
    return FusedProblem(parts)


def test_a_group_remembers_its_calls(monkeypatch):
    from runlora.planning import fusion

    calls = []
    real = groups.plan_fusion
    base = llama()
    model = runlora.from_peft(peft.get_peft_model(copy.deepcopy(base), config()))
    batch = text_batch()
    step(model, batch)  # finds the groups
    monkeypatch.setattr(groups, "plan_fusion", lambda *a: calls.append(1) or real(*a))
    for _ in range(3):
        step(model, batch)
    assert len(calls) == 2 * BLOCKS  # once per group, then from the group's memory
    decision = fusion.plan_fusion(_fused_problem(), [fusion_plan()] * 3)
    assert decision.fused and "MiB moved fused" in decision.reason


def fusion_plan():
    from runlora.planning import plan_layer

    return plan_layer(1024, 64, 64, 4)


@pytest.mark.parametrize("criterion", ["roofline", "time"])
def test_other_criteria_fuse_without_measuring_inside_the_model(criterion, monkeypatch):
    """The call is the cost model's under every criterion: nothing times the fused op inside a
    forward, where non-reentrant checkpointing would see the timing's autograd."""
    from runlora.planning import measured, roofline

    calls = []
    real = roofline.time_call, measured.time_call

    def spy(fn, *a, **k):
        calls.append(torch._C._current_graph_task_id())
        return real[0](fn, *a, **k)

    monkeypatch.setattr(roofline, "time_call", spy)
    monkeypatch.setattr(measured, "time_call", spy)
    monkeypatch.setattr(measured, "TIME_BUDGET_S", 0.02)
    reference, _, _ = build(llama(), config())
    model = runlora.from_peft(
        peft.get_peft_model(copy.deepcopy(llama()), config()), criterion=criterion
    )
    model.load_state_dict(reference.state_dict())
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    batch = text_batch()
    for _ in range(3):  # the first finds the groups, the others fuse
        got = step(model, batch)
    assert all(task == -1 for task in calls)  # planning ran outside any backward
    group = groups.group_of(model.base_model.model.model.layers[0].self_attn.q_proj)
    assert group.fusion is not None and group.fusion.fused
    reference.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference.enable_input_require_grads()
    assert_same(got, step(reference, batch), rtol=1e-4, atol=1e-6)


def test_the_flops_criterion_counts_what_stacking_saves():
    from runlora.ops.fused_variants import fused_cost, unfused_cost
    from runlora.planning import fusion, plan_layer

    plans = [plan_layer(1024, 64, 64, 4)] * 3
    problem = _fused_problem()
    fused, apart = fused_cost(problem, plans), unfused_cost(problem, plans)
    assert fused.flops == apart.flops and fused.bytes() < apart.bytes()
    assert fusion.plan_fusion(problem, plans).fused
    tiny = _fused_problem(n=2, d=64, r=4, grad=False)  # a forward of two rows: nothing to save
    tiny_plans = [plan_layer(2, 64, 64, 4, needs_input_grad=False)] * 3
    assert tiny_plans[0].forward == "sequential"  # X Aᵀ is formed, so it could be stacked
    assert not fusion.plan_fusion(tiny, tiny_plans).fused


def test_describe_says_why_the_last_call_ran_alone_after_a_planned_apart_one():
    _, ours = siblings()
    x = torch.randn(2, 16)
    sibling_step(ours, x)
    sibling_step(ours, x)  # planned apart: the siblings' two rows move more bytes stacked
    net = ours.base_model.model
    assert not groups.group_of(net.a).fusion.fused
    net.b.fuse = False
    sibling_step(ours, x)
    rows = {r.name.rpartition(".")[2]: r.detail for r in runlora.describe(ours, file=None)}
    assert "the last call ran each alone" in rows["a"] and "fuse=False" in rows["a"]
    assert "the plan runs them apart" not in rows["a"]

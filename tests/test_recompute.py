"""LoRA inputs recomputed in backward (runlora.layers.recompute, runlora.ops.remake): the same
outputs and gradients as saving them, and what the frozen model saves."""

from __future__ import annotations

import copy
import functools
import gc
import io
import pickle
import weakref

import pytest
import torch
from tiny_models import gpt2, llama, loss_of, minilm, phi3, text_batch
from torch import nn

import runlora
from runlora.bench.memory import saved_tensor_bytes, storage_ptrs
from runlora.layers import recompute
from runlora.ops.remake import Recipe, mark_remake, remake_of

peft = pytest.importorskip("peft")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_model(base, dropout=0.0, bias="none", **kw):
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=dropout,
        target_modules=ALL,
        init_lora_weights=False,
        bias=bias,
        **kw,
    )
    torch.manual_seed(3)
    return peft.get_peft_model(copy.deepcopy(base), config)


def _step(model, batch, seed=1):
    """(saved bytes, loss, {name: grad}) of one training step."""
    model.train()
    torch.manual_seed(seed)
    skip = storage_ptrs([*model.parameters(), *model.buffers()])
    saved, loss = saved_tensor_bytes(lambda: loss_of(model, batch), exclude=skip)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return saved, loss.detach(), grads


def _frozen_saved(base, batch):
    frozen = copy.deepcopy(base)
    frozen.requires_grad_(False)
    frozen.enable_input_require_grads()
    frozen.train()
    skip = storage_ptrs([*frozen.parameters(), *frozen.buffers()])
    return saved_tensor_bytes(lambda: loss_of(frozen, batch), exclude=skip)[0]


def _pair(base, **kw):
    """The same PEFT model under runlora, with and without recomputed inputs."""
    on = runlora.from_peft(_peft_model(base, **kw))
    off = runlora.from_peft(_peft_model(base, **kw), recompute_inputs=False)
    return on, off


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("bias", [False, True])
def test_same_outputs_and_gradients_as_saving_inputs(dropout, bias):
    base = llama(attention_bias=bias, mlp_bias=bias)
    on, off = _pair(base, dropout=dropout, bias="lora_only" if bias else "none")
    assert recompute.recomputed_modules(on) and not recompute.recomputed_modules(off)
    batch = text_batch()
    s_on, loss_on, g_on = _step(on, batch)
    s_off, loss_off, g_off = _step(off, batch)
    assert torch.equal(loss_on, loss_off)
    assert g_on.keys() == g_off.keys() and len(g_on) > 0
    for name in g_on:  # the same tensors formed by the same ops: bitwise
        assert torch.equal(g_on[name], g_off[name]), name
    assert s_on < s_off


def test_matches_peft_fp32_and_bf16():
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        base = llama().to(dtype)
        ref = _peft_model(base)
        ours = runlora.from_peft(_peft_model(base))
        batch = text_batch()
        _, loss_ref, g_ref = _step(ref, batch)
        _, loss_ours, g_ours = _step(ours, batch)
        torch.testing.assert_close(loss_ours, loss_ref, rtol=tol, atol=tol)
        for name, g in g_ref.items():
            scale = g.abs().max().clamp_min(1e-6)
            assert (g_ours[name] - g).abs().max() / scale < 5 * tol, name


def test_rank_pattern_and_bf16_bitwise_against_saving():
    base = llama().to(torch.bfloat16)
    on, off = _pair(base, rank_pattern={"q_proj": 2, "k_proj": 6, "gate_proj": 3})
    batch = text_batch()
    _, _, g_on = _step(on, batch)
    _, _, g_off = _step(off, batch)
    for name in g_on:
        assert torch.equal(g_on[name], g_off[name]), name


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_saves_what_the_frozen_model_saves(dropout):
    base = llama()
    batch = text_batch()
    on, off = _pair(base, dropout=dropout)
    s_on, _, _ = _step(on, batch)
    s_off, _, _ = _step(off, batch)
    frozen = _frozen_saved(base, batch)
    assert s_on <= 1.02 * frozen
    # what is no longer kept: per block, the two norm outputs (N, d) and act(gate) * up (N, m),
    # but for the first norm, whose input (the frozen embedding's output) needs no grad, so
    # that autograd keeps nothing to form it from
    n, cfg = batch["input_ids"].numel(), base.config
    per_block = (2 * cfg.hidden_size + cfg.intermediate_size) * n * 4
    first_norm = cfg.hidden_size * n * 4
    assert s_off - s_on == per_block * cfg.num_hidden_layers - first_norm


def test_describe_and_report_say_what_is_recomputed():
    model = runlora.from_peft(_peft_model(llama()))
    _step(model, text_batch())
    rows = {r.name.split(".")[-1]: r.detail for r in runlora.describe(model, file=None)}
    for proj in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"):
        assert "input recomputed" in rows[proj], (proj, rows[proj])
    assert "input saved" in rows["o_proj"]  # attention's output: no producer knows it
    report = runlora.recompute_inputs(model)
    kinds = sorted(set(report.switched.values()))
    assert kinds == ["gated_mlp", "rms_norm"] and "rms_norm" in str(report)


def test_off_gives_the_modules_their_forward_back():
    model = runlora.from_peft(_peft_model(llama()))
    assert recompute.recomputed_modules(model)
    recompute.disable(model)
    assert not recompute.recomputed_modules(model)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_gradient_checkpointing_marks_nothing():
    base = llama()
    on, off = _pair(base)
    for m in (on, off):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.enable_input_require_grads()
    batch = text_batch()
    _, loss_on, g_on = _step(on, batch)
    _, loss_off, g_off = _step(off, batch)
    assert torch.equal(loss_on, loss_off)
    for name in g_on:
        assert torch.equal(g_on[name], g_off[name]), name
    rows = runlora.describe(on, file=None)
    assert all("input saved" in r.detail for r in rows)


def test_user_checkpoint_of_a_marking_block_stays_exact():
    # torch.utils.checkpoint on a block transformers does not flag: the recompute marks too
    base = llama()
    on, off = _pair(base)
    batch = text_batch()
    for m in (on, off):
        for layer in m.base_model.model.model.layers:
            forward = layer.forward

            def checkpointed(*a, _f=forward, **k):
                return torch.utils.checkpoint.checkpoint(_f, *a, use_reentrant=False, **k)

            layer.forward = checkpointed
    _, loss_on, g_on = _step(on, batch)
    _, loss_off, g_off = _step(off, batch)
    assert torch.equal(loss_on, loss_off)
    for name in g_on:
        assert torch.equal(g_on[name], g_off[name]), name


def test_unknown_norm_semantics_keep_their_forward():
    class GemmaLikeRMSNorm(nn.Module):  # (1 + weight), as Gemma's
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(d))
            self.eps = 1e-6

        def forward(self, x):
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            return (h * (1.0 + self.weight.float())).type_as(x)

    class FusedMLP(nn.Module):  # has the names, computes something else
        def __init__(self, d):
            super().__init__()
            self.gate_proj, self.up_proj = nn.Linear(d, d), nn.Linear(d, d)
            self.down_proj, self.act_fn = nn.Linear(d, d), nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))

    model = nn.Sequential(GemmaLikeRMSNorm(8), FusedMLP(8))
    report = runlora.recompute_inputs(model)
    assert report.switched == {}
    assert set(report.skipped) == {"0", "1"}
    assert "does not compute" in report.skipped["0"]
    x = torch.randn(3, 8)
    assert torch.equal(model(x), model[1](model[0](x)))


def test_other_architectures_fall_back_cleanly():
    for base in (gpt2(), minilm()):
        targets = ["c_attn"] if hasattr(base, "transformer") else ["query", "value"]
        config = peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False)
        model = runlora.from_peft(peft.get_peft_model(copy.deepcopy(base), config))
        ref = runlora.from_peft(
            peft.get_peft_model(copy.deepcopy(base), config), recompute_inputs=False
        )
        ref.load_state_dict(model.state_dict())
        batch = text_batch(vocab=100)
        batch.pop("labels") if not hasattr(base, "lm_head") else None
        _, loss, grads = _step(model, batch)
        _, loss_ref, grads_ref = _step(ref, batch)
        torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
        for name in grads:
            torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-6, atol=1e-7)


def test_copies_and_pickles_keep_working():
    model = runlora.from_peft(_peft_model(llama()))
    batch = text_batch()
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert pickle.loads(pickle.dumps(model)) is not None
    _, loss, grads = _step(model, batch)
    for other in (twin, loaded):
        assert recompute.recomputed_modules(other) == recompute.recomputed_modules(model)
        for m in other.modules():  # the copies' forwards drive the copies, not the original
            fwd = m.__dict__.get("forward")
            assert fwd is None or fwd.module is m
        _, loss2, grads2 = _step(other, batch)
        assert torch.equal(loss, loss2)
        for name in grads:
            assert torch.equal(grads[name], grads2[name])


def test_patch_peft_recomputes_too():
    with runlora.patch_peft():
        model = _peft_model(llama())
    assert recompute.recomputed_modules(model)


def test_a_mark_is_dropped_when_its_tensor_changes():
    h = torch.randn(4, 3, requires_grad=True)
    with torch.no_grad():
        pass
    y = h * 2.0
    mark_remake(y, torch.mul, (h,), (2.0,))
    assert remake_of(y) is not None
    y.add_(1.0)  # in place after marking: the remake no longer describes y
    assert remake_of(y) is None
    z = (h * 2.0).detach()
    mark_remake(z, torch.mul, (h,), (2.0,))
    assert remake_of(z) is None  # no grad: autograd keeps nothing for the producer


def test_op_with_remake_matches_plain_autograd():
    torch.manual_seed(0)
    h = torch.randn(2, 5, 6, requires_grad=True)
    w, a, b = torch.randn(7, 6), torch.randn(3, 6, requires_grad=True), torch.randn(7, 3)
    b.requires_grad_(True)
    for marked in (True, False):
        x = torch.sigmoid(h)
        if marked:
            mark_remake(x, torch.sigmoid, (h,))
        y = runlora.lora_linear(x, w, a, b, scaling=0.5)
        y.pow(2).sum().backward()
        grads = [t.grad.clone() for t in (h, a, b)]
        for t in (h, a, b):
            t.grad = None
        if marked:
            first = grads
    x = torch.sigmoid(h)
    ref = x @ w.t() + 0.5 * (x @ a.t()) @ b.t()
    ref.pow(2).sum().backward()
    for g, t in zip(first, (h, a, b), strict=True):
        torch.testing.assert_close(g, t.grad, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(g1, g2) for g1, g2 in zip(first, grads, strict=True))


def test_a_norm_that_cannot_be_probed_keeps_its_forward():
    with torch.device("meta"):
        model = llama()
    report = runlora.recompute_inputs(model)
    assert report.switched == {k: v for k, v in report.switched.items() if v == "gated_mlp"}
    norms = [n for n in report.skipped if n.endswith("norm")]
    assert norms and all("meta" in report.skipped[n] for n in norms)


def test_bad_arguments_and_a_broken_remake_say_what_is_wrong():
    model = _peft_model(llama())
    before = {n: type(m.__dict__.get("forward")) for n, m in model.named_modules()}
    with pytest.raises(TypeError, match="recompute_inputs must be True or False"):
        runlora.from_peft(model, recompute_inputs="yes")
    assert {n: type(m.__dict__.get("forward")) for n, m in model.named_modules()} == before
    h = torch.randn(4, 6, requires_grad=True)
    x = h * 1.0
    mark_remake(x, lambda t: t[:2], (h,))  # a producer that breaks its promise
    w, a, b = torch.randn(3, 6), torch.randn(2, 6, requires_grad=True), torch.randn(3, 2)
    y = runlora.lora_linear(x, w, a, b)
    with pytest.raises(RuntimeError, match="recomputed LoRA input has shape"):
        y.sum().backward()


def _counting(monkeypatch):
    """Count the calls of the norm's and the MLP's remakes: {"norm": n, "mlp": n}."""
    calls = {"norm": 0, "mlp": 0}
    rms = recompute._rms_remake

    def rms_counted(*args):
        calls["norm"] += 1
        return rms(*args)

    def mul_counted(a, u):
        calls["mlp"] += 1
        return a * u

    monkeypatch.setattr(recompute, "_rms_remake", rms_counted)
    monkeypatch.setattr(recompute, "_mlp_remake", mul_counted)
    return calls


@pytest.mark.parametrize("fuse", [False, True])
def test_each_input_is_formed_once_per_backward_not_once_per_layer(monkeypatch, fuse):
    base = llama()
    model = runlora.from_peft(_peft_model(base), fuse=fuse)
    off = runlora.from_peft(_peft_model(base), recompute_inputs=False)
    batch = text_batch()
    n_layers = base.config.num_hidden_layers
    if fuse:
        loss_of(model, batch).backward()  # the first step finds the groups
        model.zero_grad(set_to_none=True)
    calls = _counting(monkeypatch)
    model.train()
    torch.manual_seed(1)
    loss = loss_of(model, batch)
    forward_calls = dict(calls)
    # every norm but the first block's (its input, the embeddings, needs no grad) is marked
    assert forward_calls == {"norm": 2 * n_layers + 1, "mlp": n_layers}
    loss.backward()
    backward = {k: calls[k] - forward_calls[k] for k in calls}
    # q/k/v take one formed norm output, gate/up another; down_proj's input once per block
    assert backward == {"norm": 2 * n_layers - 1, "mlp": n_layers}
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    _, loss_off, grads_off = _step(off, batch)
    assert torch.equal(loss, loss_off)
    for name, g in grads_off.items():
        if fuse:  # stacked products may sum in another order
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)
        else:  # the same products on the same tensors: bitwise
            assert torch.equal(grads[name], g), name


def test_a_retained_graph_backpropagates_twice_exactly():
    torch.manual_seed(0)
    h = torch.randn(3, 5, 6, requires_grad=True)
    ws = [torch.randn(7, 6) for _ in range(3)]
    ab = [
        (torch.randn(2, 6, requires_grad=True), torch.randn(7, 2, requires_grad=True)) for _ in ws
    ]
    x = torch.tanh(h)
    mark_remake(x, torch.tanh, (h,))
    y = sum(runlora.lora_linear(x, w, a, b, scaling=0.5) for w, (a, b) in zip(ws, ab, strict=True))
    recipe = remake_of(x).recipe
    assert recipe.claims == 3
    y.pow(2).sum().backward(retain_graph=True)
    first = [t.grad.clone() for t in (h, *[p for pair in ab for p in pair])]
    assert recipe.claims == 0 and recipe._formed is None  # let go after the last claimant
    for t in (h, *[p for pair in ab for p in pair]):
        t.grad = None
    y.pow(2).sum().backward()  # more takes than claims: formed anew each time, still exact
    second = [t.grad for t in (h, *[p for pair in ab for p in pair])]
    assert all(torch.equal(g1, g2) for g1, g2 in zip(first, second, strict=True))
    h_ref = h.detach().requires_grad_()
    x_ref = torch.tanh(h_ref)
    pairs = zip(ws, ab, strict=True)
    ref = sum(
        x_ref @ w.t() + 0.5 * (x_ref @ a.detach().t()) @ b.detach().t() for w, (a, b) in pairs
    )
    ref.pow(2).sum().backward()
    torch.testing.assert_close(first[0], h_ref.grad, rtol=1e-5, atol=1e-5)


def test_phi3_fused_gate_up_mlp_recomputes_down_projs_input():
    base = phi3()
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    batch = text_batch()

    def make(recompute):
        config = peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False)
        torch.manual_seed(3)
        model = peft.get_peft_model(copy.deepcopy(base), config)
        return runlora.from_peft(model, recompute_inputs=recompute)

    on, off = make(True), make(False)
    kinds = set(runlora.layers.recompute.recomputed_modules(on).values())
    assert kinds == {"rms_norm", "gate_up_mlp"}
    s_on, loss_on, g_on = _step(on, batch)
    s_off, loss_off, g_off = _step(off, batch)
    assert torch.equal(loss_on, loss_off)
    assert g_on.keys() == g_off.keys() and all(torch.equal(g_on[n], g_off[n]) for n in g_on)
    # down_proj's input (N, m) is no longer kept, nor the norm outputs (N, d) but the first
    n, cfg = batch["input_ids"].numel(), base.config
    per_block = (2 * cfg.hidden_size + cfg.intermediate_size) * n * 4
    assert s_off - s_on == per_block * cfg.num_hidden_layers - cfg.hidden_size * n * 4
    # against the frozen model: what is left is o_proj's input, a fresh copy of SDPA's output in
    # Phi-3 (N, d) per block; the frozen model keeps the first norm's rstd (N, 1), runlora not
    o_proj_inputs = cfg.num_hidden_layers * n * cfg.hidden_size * 4
    assert s_on == _frozen_saved(base, batch) + o_proj_inputs - n * 4
    rows = {r.name.split(".")[-1]: r.detail for r in runlora.describe(on, file=None)}
    assert "input recomputed" in rows["down_proj"] and "input recomputed" in rows["gate_up_proj"]
    # and against PEFT itself
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=targets))
    ref.load_state_dict(on.state_dict())
    _, loss_ref, g_ref = _step(ref, batch)
    torch.testing.assert_close(loss_on, loss_ref, rtol=1e-5, atol=1e-6)
    for name, g in g_ref.items():
        torch.testing.assert_close(g_on[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_an_mlp_with_another_order_keeps_its_forward():
    class Swapped(nn.Module):  # gate and up halves the other way round
        def __init__(self):
            super().__init__()
            self.gate_up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 8)
            self.activation_fn = nn.SiLU()

        def forward(self, x):
            up, gate = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(up * self.activation_fn(gate))

    model = nn.Sequential(Swapped())
    report = runlora.recompute_inputs(model)
    assert report.switched == {} and "does not compute" in report.skipped["0"]


def _three_readers(seed=0, mark=True):
    """A leaf, the producer's input h, x = tanh(h) (marked), and three LoRA ops reading x."""
    gen = torch.Generator().manual_seed(seed)
    leaf = torch.randn(8, 6, generator=gen, requires_grad=True)
    h = leaf * 1.5
    x = torch.tanh(h)
    if mark:
        mark_remake(x, torch.tanh, (h,))
    ws = [torch.randn(5, 6, generator=gen) for _ in range(3)]
    ab = [
        (torch.randn(2, 6, generator=gen).requires_grad_(), torch.randn(5, 2, generator=gen))
        for _ in ws
    ]
    for _, b in ab:
        b.requires_grad_()
    ys = [runlora.lora_linear(x, w, a, b, scaling=0.5) for w, (a, b) in zip(ws, ab, strict=True)]
    return leaf, h, x, ab, sum(y.pow(2).sum() for y in ys)


def test_a_partial_backward_lets_the_formed_input_go_when_it_ends():
    _, _, x, ab, loss = _three_readers()
    recipe = remake_of(x).recipe
    torch.autograd.grad(loss, [ab[0][0]])  # only the first reader's backward runs
    assert recipe.claims == 2 and recipe._formed is None


def test_no_tensor_of_the_forward_outlives_backward_through_the_ops():
    _, h, x, _, loss = _three_readers()
    alive = weakref.ref(h)
    del h, x
    loss.backward()  # loss itself stays referenced, as in a plain training loop
    gc.collect()
    assert alive() is None


def test_create_graph_after_a_partial_retained_backward_stays_exact():
    def second_order(mark):
        leaf, _, _, ab, loss = _three_readers(mark=mark)
        torch.autograd.grad(loss, [ab[0][0]], retain_graph=True)  # forms x without a graph
        (da,) = torch.autograd.grad(loss, [ab[1][0]], create_graph=True)
        return torch.autograd.grad(da.pow(2).sum(), [leaf])[0]

    torch.testing.assert_close(second_order(True), second_order(False), rtol=1e-6, atol=1e-6)


def test_checkpointed_attention_with_its_norm_outside_leaves_nothing_formed():
    from torch.utils.checkpoint import checkpoint

    model = runlora.from_peft(_peft_model(llama()))
    ref = runlora.from_peft(_peft_model(llama()), recompute_inputs=False)
    ref.load_state_dict(model.state_dict())
    for m in (model, ref):
        for layer in m.base_model.model.model.layers:
            attn = layer.self_attn
            attn.forward = functools.partial(checkpoint, attn.forward, use_reentrant=False)
    batch = text_batch()
    model.train()
    torch.manual_seed(1)
    loss = loss_of(model, batch)  # kept, and with it the graph's recipes
    recipes = [o for o in gc.get_objects() if isinstance(o, Recipe) and o.claims > 0]
    loss.backward()
    # the recompute's ops claim nothing: each formed input went with its last reader
    assert recipes and all(r.claims == 0 and r._formed is None for r in recipes)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    _, loss_ref, grads_ref = _step(ref, batch)
    assert torch.equal(loss.detach(), loss_ref)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_compiled_autograd_forms_the_input_for_each_op():
    from torch._dynamo import compiled_autograd

    def grads(mark, compiled):
        leaf, _, _, ab, loss = _three_readers(mark=mark)
        if compiled:
            with compiled_autograd._enable(torch.compile(backend="eager")):
                loss.backward()
        else:
            loss.backward()
        return [leaf.grad] + [t.grad for pair in ab for t in pair]

    for got, want in zip(grads(True, True), grads(False, False), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_a_backward_that_raises_does_not_stop_the_next_one_letting_go():
    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("boom")

    h = torch.randn(8, 6, requires_grad=True) * 1.5
    x = torch.tanh(h)
    mark_remake(x, torch.tanh, (h,))
    other = torch.randn(3, requires_grad=True)
    boom = Boom.apply(other * 2)  # recorded before the readers: its backward runs after theirs
    ab = [(torch.randn(2, 6, requires_grad=True), torch.randn(5, 2)) for _ in range(3)]
    ys = [runlora.lora_linear(x, torch.randn(5, 6), a, b) for a, b in ab]
    recipe = remake_of(x).recipe
    with pytest.raises(RuntimeError, match="boom"):  # after the first reader took x
        torch.autograd.grad(ys[0].sum() + boom.sum(), [ab[0][0], other])
    assert recipe.claims == 2  # the failed backward's end never came: x is still formed
    torch.autograd.grad(ys[1].sum(), [ab[1][0]])  # claims are left, and this backward ends
    assert recipe.claims == 1 and recipe._formed is None


def test_a_layer_norm_changed_in_place_after_forward_is_caught():
    torch.manual_seed(0)
    norm = nn.LayerNorm(6)
    recompute.enable(nn.Sequential(norm))
    h = torch.randn(4, 6, requires_grad=True)
    x = norm(h)
    assert remake_of(x) is not None
    a = torch.randn(2, 6, requires_grad=True)
    y = runlora.lora_linear(x, torch.randn(3, 6), a, torch.randn(3, 2))
    with torch.no_grad():
        norm.weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(y.sum(), [a])  # never reaches the norm's own backward

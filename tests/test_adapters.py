"""Several adapters on one model, against stock PEFT: add/set/delete (PEFT's own API on the
PeftModel), several active at once (one stacked op call), per-example adapters in a batch
(``adapter_names=``, forward and generate, run by ``runlora.layers.routing``), saving and
loading each adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import llama, text_batch

import runlora
import runlora.layers.layer
import runlora.layers.routing
from runlora import LoraConfig, RunLoRALinear, get_runlora_model
from runlora.integrations.distributed import plan_requests
from runlora.integrations.peft import is_accelerated
from runlora.layers.routing import Grouped, Stacked

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("single_thread")

#: adapter "default" and adapter "b": different ranks, alphas and targets (overlapping on q_proj)
DEFAULT = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
OTHER = dict(r=2, lora_alpha=16, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
MIXED = ["b", "__base__", "default", "b"]
#: runlora.layers.routing.STACKED_MAX_TOKENS values that force each way of adding the terms
FORMS = {"grouped": 0, "stacked": 10**9}


def base_llama():
    """The same tiny Llama each call."""
    torch.manual_seed(0)
    return llama()


def two_adapter_pair(default=DEFAULT, other=OTHER):
    """(PEFT model, runlora model) with adapters "default" and "b", runlora's tensors = PEFT's."""
    base = base_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**default))
    theirs.add_adapter("b", peft.LoraConfig(**other))
    ours = get_runlora_model(copy.deepcopy(base), LoraConfig(**default))
    ours.add_adapter("b", peft.LoraConfig(**other))  # down_proj: a new layer, on the op too
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    assert all_accelerated(ours)
    return theirs, ours


def lora_layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def all_accelerated(model) -> bool:
    layers = lora_layers(model)
    return bool(layers) and all(is_accelerated(m) for m in layers.values())


def record_ranks(monkeypatch) -> list:
    """The rank of every call of runlora's op."""
    ranks = []
    real = runlora.layers.layer.run_adapter

    def recording(x, base_args, lora_a, *args, **kwargs):
        ranks.append(lora_a.shape[0])
        return real(x, base_args, lora_a, *args, **kwargs)

    monkeypatch.setattr(runlora.layers.layer, "run_adapter", recording)
    return ranks


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def batch4(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 256, (4, 8), generator=gen)
    return {"input_ids": ids, "labels": ids}


def test_add_set_delete_follow_peft():
    theirs, ours = two_adapter_pair()
    assert trainable(ours) == trainable(theirs) and ours.active_adapter == "default"
    assert all(".default." in n for n in trainable(ours))  # "b" added frozen and inactive
    theirs.set_adapter("b")
    ours.set_adapter("b")
    assert trainable(ours) == trainable(theirs) and ours.active_adapter == "b"
    assert all(".b." in n for n in trainable(ours))
    batch = text_batch()
    for name in ("default", "b"):
        theirs.set_adapter(name)
        ours.set_adapter(name)
        torch.testing.assert_close(ours(**batch).loss, theirs(**batch).loss)
    for model in (theirs, ours):
        model.set_adapter("b")
        model.delete_adapter("b")
    assert list(ours.peft_config) == ["default"] and ours.active_adapter == "default"
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert trainable(ours) == trainable(theirs)


def test_several_active_adapters_sum_like_peft(monkeypatch):
    """Forward and gradients with both adapters active: one op call of the summed rank where
    both meet (q_proj)."""
    theirs, ours = two_adapter_pair()
    theirs.base_model.set_adapter(["default", "b"])
    ours.base_model.set_adapter(["default", "b"])
    ranks = record_ranks(monkeypatch)
    assert trainable(ours) == trainable(theirs)
    batch = text_batch()
    for model in (theirs, ours):
        model.train()
        model(**batch).loss.backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    for n, p in theirs.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6)
    assert sorted(ranks) == [2, 2, 4, 4, 6, 6]  # down_proj "b", v_proj "default", q_proj both
    # The stacked op call is planned for the summed rank where both adapters meet (q_proj).
    shapes = {
        (q.problem.in_features, q.problem.out_features, q.problem.r)
        for q in plan_requests(ours, n_tokens=16)
    }
    assert (64, 64, 6) in shapes and (64, 64, 4) in shapes and (128, 64, 2) in shapes


def test_several_active_adapters_with_dropout_draw_their_own_masks():
    """Training with dropout on the second adapter: it runs beside the op with its own
    nn.Dropout, drawing from the RNG as PEFT's loop does, so the same seed gives PEFT's loss.
    ("b" only where "default" is too: alone, an adapter runs in the op, whose masks come from
    its own seeded generator.)"""
    other = {**OTHER, "target_modules": ["q_proj"], "lora_dropout": 0.3}
    theirs, ours = two_adapter_pair(other=other)
    theirs.base_model.set_adapter(["default", "b"])
    ours.base_model.set_adapter(["default", "b"])
    batch = text_batch()
    losses = []
    for model in (theirs, ours):
        model.train()
        torch.manual_seed(7)
        losses.append(model(**batch).loss)
    torch.testing.assert_close(losses[1], losses[0])
    theirs.eval()
    ours.eval()
    torch.testing.assert_close(ours(**batch).loss, theirs(**batch).loss)


@pytest.mark.parametrize("form", list(FORMS))
def test_adapter_names_per_example_match_peft(form, monkeypatch):
    monkeypatch.setattr(runlora.layers.routing, "STACKED_MAX_TOKENS", FORMS[form])
    theirs, ours = two_adapter_pair()
    theirs.eval()
    ours.eval()
    batch = batch4()
    with torch.no_grad():
        want = theirs(**batch, adapter_names=MIXED).logits
        got = ours(**batch, adapter_names=MIXED).logits
        torch.testing.assert_close(got, want)
        # each row as if run alone with its adapter
        for i, name in enumerate(MIXED):
            row = {k: v[i : i + 1] for k, v in batch.items()}
            if name == "__base__":
                with ours.disable_adapter():
                    alone = ours(**row).logits
            else:
                ours.set_adapter(name, inference_mode=True)
                alone = ours(**row).logits
            torch.testing.assert_close(got[i : i + 1], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("beams", [1, 2])
def test_generate_with_adapter_names_matches_peft(beams, form, monkeypatch):
    monkeypatch.setattr(runlora.layers.routing, "STACKED_MAX_TOKENS", FORMS[form])
    theirs, ours = two_adapter_pair()
    theirs.eval()
    ours.eval()
    prompts = batch4(seed=3)["input_ids"][:, :5]
    kwargs = dict(max_new_tokens=4, do_sample=False, num_beams=beams, pad_token_id=0)
    with torch.no_grad():
        want = theirs.generate(input_ids=prompts, adapter_names=MIXED, **kwargs)
        got = ours.generate(input_ids=prompts, adapter_names=MIXED, **kwargs)
    assert torch.equal(got, want)


def test_adapter_names_with_modules_to_save_route_each_example():
    """Each adapter trains its own lm_head copy; rows run with their adapter's copy."""
    with_head = {**DEFAULT, "modules_to_save": ["lm_head"]}
    theirs, ours = two_adapter_pair(with_head, {**OTHER, "modules_to_save": ["lm_head"]})
    with torch.no_grad():
        for model in (theirs, ours):  # make the two heads differ from the original
            for name in ("default", "b"):
                head = model.get_base_model().lm_head.modules_to_save[name]
                head.weight.add_(torch.randn_like(head.weight) * 0.1)
    ours.load_state_dict(theirs.state_dict())
    theirs.eval()
    ours.eval()
    batch = batch4()
    with torch.no_grad():
        torch.testing.assert_close(
            ours(**batch, adapter_names=MIXED).logits,
            theirs(**batch, adapter_names=MIXED).logits,
        )


def test_each_adapter_saves_where_peft_does_and_loads_both_ways(tmp_path):
    theirs, ours = two_adapter_pair()
    ours.save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "ours" / "b" / "adapter_config.json").is_file()
    theirs.save_pretrained(tmp_path / "peft")
    theirs.eval()
    batch = batch4()
    with torch.no_grad():
        want = theirs(**batch, adapter_names=MIXED).logits
    # PEFT reads ours
    loaded = peft.PeftModel.from_pretrained(base_llama(), str(tmp_path / "ours"))
    loaded.load_adapter(str(tmp_path / "ours" / "b"), adapter_name="b")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch, adapter_names=MIXED).logits, want)
    # we read PEFT's
    back = runlora.from_pretrained(base_llama(), tmp_path / "peft")
    back.load_adapter(tmp_path / "peft" / "b", adapter_name="b")
    assert set(back.peft_config) == {"default", "b"} and not trainable(back)
    assert all_accelerated(back)
    with torch.no_grad():
        torch.testing.assert_close(back(**batch, adapter_names=MIXED).logits, want)
    # selected_adapters: only "b", in its subdirectory
    ours.save_pretrained(tmp_path / "only_b", selected_adapters=["b"])
    assert not (tmp_path / "only_b" / "adapter_config.json").exists()
    assert (tmp_path / "only_b" / "b" / "adapter_model.safetensors").is_file()


def test_load_adapter_as_trainable_trains_after_set_adapter(tmp_path):
    _, ours = two_adapter_pair()
    ours.save_pretrained(tmp_path)
    model = runlora.from_pretrained(base_llama(), tmp_path, is_trainable=True)
    model.load_adapter(tmp_path / "b", "b", is_trainable=True)
    stock = peft.PeftModel.from_pretrained(base_llama(), tmp_path, is_trainable=True)
    stock.load_adapter(tmp_path / "b", "b", is_trainable=True)
    assert all_accelerated(model)
    assert trainable(model) == trainable(stock)
    assert any(".default." in n for n in trainable(model))
    for m in (model, stock):
        m.set_adapter("b")
    assert trainable(model) == trainable(stock)
    assert trainable(model) == {n for n, _ in ours.named_parameters() if ".b." in n}


def test_merge_and_unload_several_active_adapters():
    _, ours = two_adapter_pair()
    ours.base_model.set_adapter(["default", "b"])
    ours.eval()
    batch = text_batch()
    with torch.no_grad():
        want = ours(**batch).logits
        merged = ours.merge_and_unload()
        torch.testing.assert_close(merged(**batch).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("shape", [(5, 16), (5, 3, 16), (5, 2, 3, 16)])
def test_layer_takes_adapter_names_directly(form, shape, monkeypatch):
    """Both ways of adding the terms, on 2-D to 4-D inputs: row i is x[i] run alone."""
    monkeypatch.setattr(runlora.layers.routing, "STACKED_MAX_TOKENS", FORMS[form])
    layer = RunLoRALinear(torch.nn.Linear(16, 8), r=2, init_lora_weights=False)
    layer.update_layer("b", 3, 6, init_lora_weights=False)
    layer.eval()
    x = torch.randn(*shape)
    names = ["b", "default", "__base__", "b", "default"]
    with torch.no_grad():
        got = layer(x, adapter_names=names)
        for i, name in enumerate(names):
            want = layer.base_layer(x[i])
            if name != "__base__":
                want = want + x[i] @ layer.delta_weight(name).t()
            torch.testing.assert_close(got[i], want)


BAD_CALLS = {
    "set_adapter unknown": lambda m: m.set_adapter("nope"),
    "delete_adapter unknown": lambda m: m.delete_adapter("nope"),
    "add_adapter existing": lambda m: m.add_adapter("b", peft.LoraConfig(**OTHER)),
    "adapter_names unknown": lambda m: m.eval()(**batch4(), adapter_names=["b", "c", "b", "b"]),
    "adapter_names count": lambda m: m.eval()(**batch4(), adapter_names=["b"] * 3),
    "adapter_names a str": lambda m: m.eval()(**batch4(), adapter_names="b"),
    "adapter_names training": lambda m: m.train()(**batch4(), adapter_names=["b"] * 4),
    "generate count": lambda m: m.eval().generate(
        input_ids=batch4()["input_ids"], adapter_names=["b", "default"], max_new_tokens=1
    ),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_adapter_calls_raise_pefts_errors_before_any_op_call(case, monkeypatch):
    theirs, ours = two_adapter_pair()
    with pytest.raises(Exception) as expected:
        BAD_CALLS[case](theirs)
    ranks = record_ranks(monkeypatch)
    with pytest.raises(type(expected.value)) as actual:
        BAD_CALLS[case](ours)
    assert str(actual.value) == str(expected.value)
    assert not ranks


def test_adapter_names_refused_while_merged():
    for model in two_adapter_pair():
        model.eval()
        model.merge_adapter()
        with pytest.raises(ValueError, match="merged"):
            model(**batch4(), adapter_names=MIXED)


@pytest.mark.parametrize("form", list(FORMS))
def test_adapter_names_on_a_bf16_base_with_fp32_adapters(form, monkeypatch):
    monkeypatch.setattr(runlora.layers.routing, "STACKED_MAX_TOKENS", FORMS[form])
    base = torch.nn.Linear(32, 16).to(torch.bfloat16)
    layer = RunLoRALinear(base, r=4, init_lora_weights=False)
    layer.update_layer("b", 2, 4, init_lora_weights=False)
    for module in (*layer.lora_A.values(), *layer.lora_B.values()):
        module.float()
    layer.eval()
    x = torch.randn(6, 5, 32, dtype=torch.bfloat16)
    names = ["default", "b", "__base__", "b", "default", "b"]
    with torch.no_grad():
        got = layer(x, adapter_names=names)
    assert got.dtype == torch.bfloat16
    w, bias = base.weight.double(), base.bias.double()
    for i, name in enumerate(names):
        want = x[i].double() @ w.t() + bias
        if name != "__base__":
            want = want + x[i].double() @ layer.delta_weight(name).double().t()
        torch.testing.assert_close(got[i].double(), want, rtol=2e-2, atol=2e-2)


def test_stacked_adapters_follow_weight_changes(monkeypatch):
    """The stacked A/B kept between no-grad calls are rebuilt once a weight changes."""
    monkeypatch.setattr(runlora.layers.routing, "STACKED_MAX_TOKENS", FORMS["stacked"])
    layer = RunLoRALinear(torch.nn.Linear(16, 8), r=2, init_lora_weights=False)
    layer.update_layer("b", 3, 6, init_lora_weights=False)
    layer.eval()
    x = torch.randn(4, 16)
    names = ["b", "default", "b", "default"]
    with torch.no_grad():
        first = layer(x, adapter_names=names)
        layer.lora_B["b"].weight.add_(1.0)
        second = layer(x, adapter_names=names)
    moved = x[0] @ (layer.scaling["b"] * layer.lora_A["b"].weight.t()).sum(1) * torch.ones(8)
    torch.testing.assert_close(second[0] - first[0], moved)
    torch.testing.assert_close(second[1], first[1])


@pytest.mark.parametrize("form", list(FORMS))
def test_one_adapter_names_list_reused_after_a_weight_change(form, monkeypatch):
    """PEFT hands every layer the caller's adapter_names list; the terms runlora keeps for it
    between no-grad calls follow the weights when the same list comes back after they changed
    (an optimizer step, load_state_dict)."""
    monkeypatch.setattr(runlora.layers.routing, "STACKED_MAX_TOKENS", FORMS[form])
    theirs, ours = two_adapter_pair()
    theirs.eval()
    ours.eval()
    ids = batch4()["input_ids"]
    names = list(MIXED)
    with torch.no_grad():
        first = ours(input_ids=ids, adapter_names=names).logits
        for model in (theirs, ours):
            for n, p in model.named_parameters():
                if ".b." in n and "lora_B" in n:
                    p.add_(0.5)
        want = theirs(input_ids=ids, adapter_names=names).logits
        got = ours(input_ids=ids, adapter_names=names).logits
    assert not torch.allclose(got, first)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "names",
    [
        ["__base__"] * 4,
        ["default"] * 4,
        ["b"] * 4,
        ["default", "__base__", "default", "default"],  # down_proj has no term for any row
    ],
)
def test_adapter_names_where_a_layer_has_nothing_to_add(names):
    theirs, ours = two_adapter_pair()
    theirs.eval()
    ours.eval()
    with torch.no_grad():
        want = theirs(**batch4(), adapter_names=names).logits
        torch.testing.assert_close(ours(**batch4(), adapter_names=names).logits, want)
    layer = RunLoRALinear(torch.nn.Linear(16, 8), r=2).eval()
    x = torch.randn(2, 16)
    torch.testing.assert_close(layer(x, adapter_names=["__base__"] * 2), layer.base_layer(x))


def test_a_new_adapter_waits_for_set_adapter_everywhere():
    """Right after add_adapter, layers only the new adapter targets run the base (PEFT)."""
    _, ours = two_adapter_pair()
    base = base_llama()
    theirs = peft.get_peft_model(base, peft.LoraConfig(**DEFAULT))
    ours2 = get_runlora_model(base_llama(), LoraConfig(**DEFAULT))
    ours2.load_state_dict(theirs.state_dict())
    theirs.add_adapter("b", peft.LoraConfig(**OTHER))
    ours2.add_adapter("b", peft.LoraConfig(**OTHER))
    down = ours2.get_base_model().model.layers[0].mlp.down_proj
    assert is_accelerated(down)
    assert down.active_adapters == ["default"] and ours2.active_adapter == "default"
    batch = text_batch()
    torch.testing.assert_close(ours2(**batch).loss, theirs(**batch).loss)
    assert trainable(ours2) == trainable(theirs)


def test_set_adapter_without_modules_to_save_runs_the_original_module():
    with_head = {**DEFAULT, "modules_to_save": ["lm_head"]}
    theirs, ours = two_adapter_pair(with_head, OTHER)
    with torch.no_grad():
        for model in (theirs, ours):
            head = model.get_base_model().lm_head.modules_to_save["default"]
            head.weight.add_(1.0)
    for model in (theirs, ours):
        model.set_adapter("b")
    batch = text_batch()
    torch.testing.assert_close(ours(**batch).loss, theirs(**batch).loss)
    heads = [m.get_base_model().lm_head for m in (theirs, ours)]
    assert heads[1].active_adapters == heads[0].active_adapters == []


def test_merge_and_unload_an_adapter_that_skips_some_layers():
    _, ours = two_adapter_pair()
    ours.set_adapter("b", inference_mode=True)
    ours.eval()
    batch = text_batch()
    with torch.no_grad():
        want = ours(**batch).logits
        merged = ours.merge_and_unload(adapter_names=["b"])
        torch.testing.assert_close(merged(**batch).logits, want, rtol=1e-5, atol=1e-5)


def test_decoding_steps_after_a_long_prefill_add_the_terms_stacked(monkeypatch):
    _, ours = two_adapter_pair()
    ours.eval()
    seen = []
    real = runlora.layers.routing.layer_terms

    def recording(layer, x, routing):
        terms = real(layer, x, routing)
        seen.append((x.numel() // x.shape[-1], type(terms)))
        return terms

    monkeypatch.setattr(runlora.layers.routing, "layer_terms", recording)
    prompts = torch.randint(1, 256, (4, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours.generate(
            input_ids=prompts,
            adapter_names=MIXED,
            max_new_tokens=3,
            do_sample=False,
            pad_token_id=0,
            use_cache=True,
        )
    forms = {tokens: {f for t, f in seen if t == tokens} for tokens, _ in seen}
    assert forms[160] == {Grouped}  # prefill: 4 prompts x 40 tokens
    assert Stacked in forms[4]  # decoding: where two adapters meet (q_proj)


def test_several_adapters_with_bias_are_refused_as_in_peft():
    for build in (peft.get_peft_model, get_runlora_model):
        model = build(base_llama(), peft.LoraConfig(**DEFAULT, bias="lora_only"))
        model.add_adapter("b", peft.LoraConfig(**OTHER))  # PEFT: fine while "b" has none
        with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
            model.add_adapter("c", peft.LoraConfig(**OTHER, bias="all"))


def test_set_adapter_leaves_other_parameters_as_the_user_set_them():
    for model in two_adapter_pair():
        norm = model.get_base_model().model.norm.weight
        norm.requires_grad_(True)
        model.set_adapter("b")
        assert norm.requires_grad


@pytest.mark.parametrize("form", list(FORMS))
def test_adapter_names_on_a_bf16_model_with_pefts_fp32_adapters(form, monkeypatch):
    monkeypatch.setattr(runlora.layers.routing, "STACKED_MAX_TOKENS", FORMS[form])
    base = base_llama().to(torch.bfloat16)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**DEFAULT))
    theirs.add_adapter("b", peft.LoraConfig(**OTHER))
    ours = get_runlora_model(copy.deepcopy(base), LoraConfig(**DEFAULT))
    ours.add_adapter("b", peft.LoraConfig(**OTHER))
    ours.load_state_dict(theirs.state_dict())
    assert {p.dtype for n, p in ours.named_parameters() if "lora_" in n} == {torch.float32}
    theirs.eval()
    ours.eval()
    with torch.no_grad():
        want = theirs(**batch4(), adapter_names=MIXED).logits
        got = ours(**batch4(), adapter_names=MIXED).logits
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)

"""Accelerated PEFT models at run time: a bf16 base with PEFT's fp32 adapters, pickle and
deepcopy, and runlora without PEFT installed."""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import count_op_calls
from tiny_models import llama, text_batch

import runlora
import runlora.layers.layer
from runlora.integrations.peft import is_accelerated

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def lora_layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def test_bf16_base_with_pefts_fp32_adapters(monkeypatch):
    """PEFT's default autocast_adapter_dtype=True keeps the adapters in fp32 on a bf16 base: the
    op runs in bf16 (the activations' dtype), matches PEFT within bf16 precision, and the
    gradients land in fp32."""
    base = llama().to(torch.bfloat16)
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**CONFIG))
    ours = runlora.get_runlora_model(copy.deepcopy(base), runlora.LoraConfig(**CONFIG))
    ours.load_state_dict(reference.state_dict())
    for model in (reference, ours):
        dtypes = {n.split(".")[-3]: p.dtype for n, p in model.named_parameters() if "lora_" in n}
        assert set(dtypes.values()) == {torch.float32}, dtypes
    layers = lora_layers(ours)
    assert all(is_accelerated(m) for m in layers.values())
    dtypes = []
    real = runlora.layers.layer.lora_linear

    def recording(x, weight, lora_a, lora_b, *args, **kwargs):
        dtypes.append((x.dtype, weight.dtype, lora_a.dtype, lora_b.dtype))
        return real(x, weight, lora_a, lora_b, *args, **kwargs)

    monkeypatch.setattr(runlora.layers.layer, "lora_linear", recording)
    batch = text_batch()
    logits = []
    for model in (reference, ours):
        model.train()
        out = model(**batch)
        out.loss.backward()
        logits.append(out.logits.float())
    assert len(dtypes) == len(layers) and set(dtypes) == {(torch.bfloat16,) * 4}
    torch.testing.assert_close(logits[1], logits[0], rtol=2e-2, atol=2e-2)
    theirs = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert mine.keys() == theirs.keys() and mine
    for name, grad in theirs.items():
        assert mine[name].dtype == torch.float32, name
        error = (mine[name] - grad).norm() / grad.norm()
        assert error < 3e-2, f"{name}: relative error {error:.3g}"


def _same_results(a, b):
    batch = text_batch()
    with torch.no_grad():
        torch.testing.assert_close(a(**batch).logits, b(**batch).logits, rtol=0, atol=0)


@pytest.mark.parametrize("how", ["torch.save", "pickle", "deepcopy"])
@pytest.mark.parametrize("way", ["get_runlora_model", "patch_peft"])
def test_an_accelerated_model_pickles_and_deep_copies(how, way):
    base = llama()
    if way == "get_runlora_model":
        model = runlora.get_runlora_model(base, runlora.LoraConfig(**CONFIG))
    else:
        with runlora.patch_peft():
            model = peft.get_peft_model(base, peft.LoraConfig(**CONFIG))
    model.eval()
    with torch.no_grad():
        model(**text_batch())  # a plan is cached on each layer
    if how == "torch.save":
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    elif how == "pickle":
        twin = pickle.loads(pickle.dumps(model))
    else:
        twin = copy.deepcopy(model)
    assert isinstance(twin, peft.PeftModel)
    twins = lora_layers(twin)
    assert twins.keys() == lora_layers(model).keys()
    assert all(is_accelerated(m) and m.criterion == "flops" for m in twins.values())
    _same_results(twin, model)
    with torch.no_grad():  # the copy reads its own weights
        for n, p in twin.named_parameters():
            if "lora_B" in n:
                p.add_(1.0)
    batch = text_batch()
    with torch.no_grad():
        assert not torch.allclose(twin(**batch).logits, model(**batch).logits)
    twin.add_adapter("b", peft.LoraConfig(r=2, target_modules=["down_proj"]))
    if way == "get_runlora_model":  # its new layers run the op too, also after the copy
        assert all(is_accelerated(m) for m in lora_layers(twin).values())


def test_without_peft_the_op_and_the_layer_work_and_the_model_api_says_what_to_install():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["peft"] = None  # `import peft` now fails as if it were not installed
        import torch
        from torch import nn
        import runlora

        x = torch.randn(3, 8, requires_grad=True)
        w, a, b = torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2)
        y = runlora.lora_linear(x, w, a, b, scaling=2.0)
        torch.testing.assert_close(y, x @ w.t() + 2.0 * (x @ a.t()) @ b.t())
        layer = runlora.RunLoRALinear(nn.Linear(8, 4), r=2, init_lora_weights=False)
        layer(x).sum().backward()
        assert layer.lora_A["default"].weight.grad is not None
        rows = runlora.describe(nn.Sequential(layer), file=None)
        assert [r.engine for r in rows] == ["runlora"], rows
        calls = {
            "get_runlora_model": lambda: runlora.get_runlora_model(
                nn.Sequential(nn.Linear(8, 4)), runlora.LoraConfig(target_modules=["0"])
            ),
            "from_peft": lambda: runlora.from_peft(nn.Linear(2, 2)),
            "from_pretrained": lambda: runlora.from_pretrained(nn.Linear(2, 2), "unused"),
            "patch_peft": runlora.patch_peft,
        }
        for name, call in calls.items():
            try:
                call()
            except ImportError as err:
                assert "pip install 'runlora[hf]'" in str(err), (name, err)
            else:
                raise SystemExit(f"{name} raised no ImportError")
        assert "peft" not in [m for m in sys.modules if sys.modules[m] is not None]
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_runlora_model_is_gone_with_a_pointer_to_the_replacements():
    with pytest.raises(AttributeError, match="get_runlora_model.*from_pretrained"):
        runlora.RunLoRAModel  # noqa: B018
    assert "RunLoRAModel" not in runlora.__all__
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        runlora.nope  # noqa: B018


def test_a_saved_model_loads_in_a_fresh_process(tmp_path):
    """A process that has not switched any layer yet (torch.load, a spawned worker) finds the
    accelerated class by its name."""
    model = runlora.get_runlora_model(llama(), runlora.LoraConfig(**CONFIG)).eval()
    ids = text_batch()["input_ids"]
    with torch.no_grad():
        torch.save(
            {"model": model, "ids": ids, "logits": model(input_ids=ids).logits}, tmp_path / "m.pt"
        )
    code = textwrap.dedent(
        f"""
        import torch
        saved = torch.load({str(tmp_path / "m.pt")!r}, weights_only=False)
        model = saved["model"]
        from runlora.integrations.peft import is_accelerated
        layers = [m for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
        assert layers and all(is_accelerated(m) for m in layers)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=saved["ids"]).logits, saved["logits"])
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_a_replaced_base_layer_is_the_one_the_op_reads(monkeypatch):
    """The layer finds its base once, and again when ``base_layer`` is replaced: outputs follow
    the new base as PEFT's do, through the op."""
    base = llama()
    reference = peft.get_peft_model(copy.deepcopy(base), peft_config())
    ours = runlora.get_runlora_model(base, peft_config())
    ours.load_state_dict(reference.state_dict())
    batch = text_batch()
    with torch.no_grad():
        assert torch.equal(ours(**batch).logits, reference(**batch).logits)
        new = torch.nn.Linear(64, 64).requires_grad_(False)
        for model in (ours, reference):
            q = model.get_base_model().model.layers[0].self_attn.q_proj
            q.base_layer = copy.deepcopy(new)
        calls = count_op_calls(monkeypatch)
        torch.testing.assert_close(ours(**batch).logits, reference(**batch).logits)
    assert len(calls) == len(lora_layers(ours))


def peft_config():
    return peft.LoraConfig(**CONFIG)


def test_a_base_offloaded_by_accelerate_runs_pefts_forward(monkeypatch):
    """accelerate's device_map offload loads the weight in a hook around the base layer's own
    forward, which the op does not call: such a layer runs PEFT's forward, and says so."""

    class OffloadHook:  # stands in for accelerate's AlignDevicesHook(offload=True)
        offload = True

    ours = runlora.get_runlora_model(llama(), peft_config())
    q = ours.get_base_model().model.layers[0].self_attn.q_proj
    q.base_layer._hf_hook = OffloadHook()
    q.__dict__.pop("_runlora_base", None)
    calls = count_op_calls(monkeypatch)
    with torch.no_grad():
        ours(**text_batch())
    assert len(calls) == len(lora_layers(ours)) - 1
    row = {r.name: r for r in runlora.describe(ours, file=None)}
    assert (
        "offloaded by accelerate" in row[next(n for n, m in ours.named_modules() if m is q)].detail
    )


def test_the_short_path_takes_the_list_form_of_one_active_adapter(monkeypatch):
    """PEFT's set_adapter stores the active adapter as a one-name list; that is still the
    op's short path and gives PEFT's result."""
    base = llama()
    reference = peft.get_peft_model(copy.deepcopy(base), peft_config())
    ours = runlora.get_runlora_model(base, peft_config())
    ours.load_state_dict(reference.state_dict())
    for model in (ours, reference):
        model.base_model.set_adapter(["default"])
    q = ours.get_base_model().model.layers[0].self_attn.q_proj
    assert q._active_adapter == ["default"]
    monkeypatch.setattr(type(q), "run", lambda *a: pytest.fail("left the short path"))
    batch = text_batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, reference(**batch).logits)

"""torch.compile: RunLoRALinear and an accelerated PEFT layer compile without graph breaks; a
compiled PeftModel from get_runlora_model trains like eager."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from runlora import LoraConfig, RunLoRALinear, get_runlora_model

IN, OUT, R = 32, 48, 4
#: aot_eager traces forward and backward like inductor does, without compiling C++ (minutes on CPU).
BACKEND = "aot_eager"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def assert_compiled_like_eager(layer, compiled, eager, in_features: int) -> None:
    """``compiled`` (of ``layer``) and its eager copy give the same outputs and gradients at two
    token counts (two plans)."""
    for n in (5, 300):
        x = torch.randn(2, n, in_features, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        y, y_ref = compiled(x), eager(x2)
        torch.testing.assert_close(y, y_ref)
        dy = torch.randn_like(y)
        y.backward(dy)
        y_ref.backward(dy)
        torch.testing.assert_close(x.grad, x2.grad)
        for name in ("lora_A", "lora_B"):
            torch.testing.assert_close(
                getattr(layer, name)["default"].weight.grad,
                getattr(eager, name)["default"].weight.grad,
            )
        layer.zero_grad()
        eager.zero_grad()


@pytest.mark.parametrize("bias", [True, False])
def test_layer_compiles_fullgraph(bias):
    layer = RunLoRALinear(nn.Linear(IN, OUT, bias=bias), R, 8, init_lora_weights=False)
    eager = copy.deepcopy(layer)
    compiled = torch.compile(layer, fullgraph=True, backend=BACKEND)
    assert_compiled_like_eager(layer, compiled, eager, IN)


def test_layer_with_dropout_compiles_around_the_mask_draw():
    """With dropout the mask draw is a graph break (fullgraph needs dropout 0); the compiled
    layer draws the same mask as eager after the same seed, and gives the same gradients."""
    layer = RunLoRALinear(nn.Linear(IN, OUT), R, 8, lora_dropout=0.2, init_lora_weights=False)
    eager = copy.deepcopy(layer)
    compiled = torch.compile(layer, backend=BACKEND)
    x = torch.randn(3, 40, IN, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    torch.manual_seed(7)
    y = compiled(x)
    torch.manual_seed(7)
    y_ref = eager(x2)
    torch.testing.assert_close(y, y_ref)
    assert not torch.allclose(y, layer.base_layer(x))  # the LoRA branch is there, masked
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(
        layer.lora_A["default"].weight.grad, eager.lora_A["default"].weight.grad
    )


def test_dynamic_shapes_recompile_per_bucket_only():
    layer = RunLoRALinear(nn.Linear(IN, OUT), R, 8)
    compiled = torch.compile(layer, fullgraph=True, backend=BACKEND)
    stats = torch._dynamo.utils.counters["stats"]
    start, graphs = stats["unique_graphs"], []
    for n in (600, 601, 630, 1000):  # 600: static graph; 601: dynamic, guarded to its bucket
        compiled(torch.randn(n, IN, requires_grad=True)).sum().backward()
        graphs.append(stats["unique_graphs"] - start)
    assert graphs == [1, 2, 2, 3]  # 630 is in 601's bucket (513..640), 1000 is not


@pytest.mark.parametrize("build", ["llama", "gpt2"])
def test_an_accelerated_peft_layer_compiles_fullgraph(build):
    """PEFT's own Linear (nn.Linear base, and Conv1D with fan_in_fan_out), switched to
    runlora's forward: no graph break, eager's outputs and gradients."""
    tiny_models = pytest.importorskip("tiny_models")
    from runlora.integrations.peft import is_accelerated

    target, path = {
        "llama": ("q_proj", "model.layers.0.self_attn.q_proj"),
        "gpt2": ("c_attn", "transformer.h.0.attn.c_attn"),
    }[build]
    model = get_runlora_model(
        getattr(tiny_models, build)(),
        LoraConfig(
            r=R, target_modules=[target], init_lora_weights=False, fan_in_fan_out=build == "gpt2"
        ),
    )
    layer = model.base_model.model.get_submodule(path)
    assert is_accelerated(layer)
    eager = copy.deepcopy(layer)
    compiled = torch.compile(layer, fullgraph=True, backend=BACKEND)
    assert_compiled_like_eager(layer, compiled, eager, 64)


def test_compiled_llama_trains_like_eager():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=256,
    )
    base = transformers.LlamaForCausalLM(config)
    lora = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    eager = get_runlora_model(copy.deepcopy(base), lora)
    model = get_runlora_model(copy.deepcopy(base), lora)
    model.load_state_dict(eager.state_dict())
    peft = pytest.importorskip("peft")
    assert isinstance(model, peft.PeftModel)
    compiled = torch.compile(model, backend=BACKEND)
    opts = [
        torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        for m in (eager, model)
    ]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, 256, (2, 16), generator=gen)
        losses = []
        for m, opt in zip((eager, compiled), opts, strict=True):
            opt.zero_grad()
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)

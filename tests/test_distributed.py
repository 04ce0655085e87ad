"""runlora under torch.distributed on CPU: 2 processes, gloo, a tiny Llama (hidden 64, 2 layers).

Each test spawns its ranks with ``torch.multiprocessing``; the workers write what they end with
(LoRA weights, plans, frozen shards) to files and the parent compares it with a single process
that trains on the same global batch. Every run is bounded: the process group has a short
timeout and the parent gives up (killing the ranks) after ``JOB_TIMEOUT_S``.
"""

from __future__ import annotations

import datetime
import faulthandler
import json
import os
import socket
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

WORLD = 2
STEPS = 3
LOCAL_BATCH, SEQ = 2, 16
LR = 0.5
JOB_TIMEOUT_S = 90
PG_TIMEOUT_S = 30
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: fp32, same plans: only the order of the gradient sums differs from the single process.
ATOL = 2e-6


# --- shared by parent and workers ---------------------------------------------------------


def tiny_lora_model(criterion: str = "flops"):
    """get_runlora_model on llama_tiny (a ``peft.PeftModel``), every block linear adapted, A and
    B random (seeded), every LoRA layer on runlora's op."""
    from runlora import LoraConfig, get_runlora_model

    model = get_runlora_model(tiny_base(), LoraConfig(**_LORA_KWARGS, criterion=criterion))
    assert len(lora_layers(model)) == N_LORA_LAYERS
    return model


def tiny_base():
    from runlora.configs import build_model, load_config

    return build_model(load_config("llama_tiny"), seed=0)


def lora_layers(model) -> dict:
    """The LoRA layers of ``model`` that run runlora's op, by name; every LoRA layer must."""
    from peft.tuners.lora import LoraLayer

    from runlora.integrations.peft import is_accelerated

    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    slow = [n for n, m in layers.items() if not is_accelerated(m)]
    assert not slow, f"LoRA layers running PEFT's forward: {slow}"
    return layers


_LORA_KWARGS = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
N_LORA_LAYERS = 2 * len(TARGETS)


def global_batches(steps: int = STEPS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, 512, (WORLD * LOCAL_BATCH, SEQ), generator=g) for _ in range(steps)]


def local_rows(batch: torch.Tensor, rank: int) -> torch.Tensor:
    return batch[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH]


def lora_state(model) -> dict[str, torch.Tensor]:
    """Trainable tensors by name, full and on CPU (gathered from FSDP2 shards if need be)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if isinstance(p, DTensor) else p
            out[name.replace("module.", "", 1) if name.startswith("module.") else name] = (
                t.detach().cpu().clone()
            )
    return out


def train(model, batches, rank: int | None) -> list[float]:
    """SGD steps; each rank sees its rows of each global batch (all rows if rank is None)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for batch in batches:
        ids = batch if rank is None else local_rows(batch, rank)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


# --- worker side --------------------------------------------------------------------------


def _init(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
    )


def _worker(rank: int, scenario: str, port: int, out: str) -> None:
    faulthandler.enable()  # a rank that aborts in C++ prints its Python stack
    from runlora.integrations.distributed import shutdown

    _init(rank, port)
    SCENARIOS[scenario](rank, Path(out))  # a failing rank raises: spawn reports it
    shutdown()


def _ddp_and_plans(rank: int, out: Path) -> None:
    import runlora.planning.roofline
    from runlora.integrations.distributed import save_adapter, sync_plans
    from runlora.planning.cache import PlanCache

    if rank != 0:  # only rank 0 may measure anything

        def refuse(*args, **kwargs):
            raise AssertionError(f"rank {rank} measured a variant: plans were not shared")

        runlora.planning.roofline.time_call = refuse
    model = tiny_lora_model(criterion="roofline")
    plans = sync_plans(model, n_tokens=LOCAL_BATCH * SEQ)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    losses = train(ddp, global_batches(), rank)
    used = {name: layer._last_plan[1].to_dict() for name, layer in lora_layers(model).items()}
    assert len(used) == N_LORA_LAYERS
    # Both ranks merge their entries into one cache file at the same moment.
    shared = PlanCache(out / "shared_cache" / "plans.json")
    dist.barrier()
    for i in range(20):
        shared.put("plans", f"rank{rank}-entry{i}", {"i": i})
    dist.barrier()
    save_adapter(ddp, out / "adapter")
    torch.save(
        {
            "plans": {repr(k): v.to_dict() for k, v in plans.items()},
            "used": used,
            "losses": losses,
            "lora": lora_state(ddp),
        },
        out / f"rank{rank}.pt",
    )


def _fsdp(rank: int, out: Path) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    import runlora.layers.layer
    from runlora.integrations.distributed import save_adapter

    seen = []
    current = {}
    real_op = runlora.layers.layer.lora_linear

    def recording_op(x, weight, *args, **kwargs):
        seen.append(
            (
                isinstance(weight, DTensor),
                weight.requires_grad,
                weight is current["weight"],
                x.dtype,
            )
        )
        return real_op(x, weight, *args, **kwargs)

    runlora.layers.layer.lora_linear = recording_op
    results = {}
    for label, grad_ckpt, param_dtype in (
        ("fp32", False, None),
        ("fp32_ckpt", True, None),
        ("bf16", False, torch.bfloat16),
    ):
        model = tiny_lora_model()
        for layer in lora_layers(model).values():
            layer.register_forward_pre_hook(
                lambda mod, args: current.__setitem__("weight", mod.base_layer.weight)
            )
        if grad_ckpt:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in model.get_base_model().model.layers:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        frozen_before = {
            n: p.to_local().clone() for n, p in model.named_parameters() if not p.requires_grad
        }
        seen.clear()
        losses = train(model, global_batches(), rank)
        frozen_same = all(
            torch.equal(p.to_local(), frozen_before[n])
            for n, p in model.named_parameters()
            if not p.requires_grad
        )
        results[label] = {
            "losses": losses,
            "lora": lora_state(model),
            "seen": list(seen),
            "frozen_same": frozen_same,
            "n_frozen": len(frozen_before),
        }
        if label == "fp32":
            save_adapter(model, out / "adapter")
    torch.save(results, out / f"rank{rank}.pt")


ACCELERATE_FSDP2_YAML = Path(__file__).parents[1] / "examples/accelerate_configs/fsdp2.yaml"


def _accelerate_fsdp2(rank: int, out: Path) -> None:
    """accelerate's FSDP2 ``prepare`` with the shipped fsdp2.yaml's settings (per-layer
    sharding, activation checkpointing; fp32, then its bf16 mixed precision), as ``accelerate
    launch`` runs it on GPUs. accelerate 1.15 turns FSDP on only for accelerator devices, so the
    CPU state's type is set to FSDP by hand; from there ``prepare`` runs accelerate's own code
    (fsdp2_apply_ac, fsdp2_prepare_model, the optimizer's parameter swap)."""
    import yaml
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    import runlora.layers.layer
    from runlora.integrations.distributed import save_adapter, sync_plans

    seen_dtypes = set()
    real_op = runlora.layers.layer.lora_linear

    def recording_op(x, *args, **kwargs):
        seen_dtypes.add(x.dtype)
        return real_op(x, *args, **kwargs)

    runlora.layers.layer.lora_linear = recording_op
    settings = yaml.safe_load(ACCELERATE_FSDP2_YAML.read_text())
    fsdp = settings["fsdp_config"]
    results = {}
    for precision in ("no", settings["mixed_precision"]):
        AcceleratorState._reset_state()  # a new Accelerator per run; the process group stays
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=fsdp["fsdp_version"],
            auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"],
            transformer_cls_names_to_wrap=[fsdp["fsdp_transformer_layer_cls_to_wrap"]],
            reshard_after_forward=fsdp["fsdp_reshard_after_forward"],
            activation_checkpointing=fsdp["fsdp_activation_checkpointing"],
            state_dict_type=fsdp["fsdp_state_dict_type"],
        )
        accelerator = Accelerator(cpu=True, mixed_precision=precision)
        accelerator.state.distributed_type = DistributedType.FSDP  # as on GPUs:
        accelerator.state.fsdp_plugin = plugin
        if precision != "no":
            plugin.set_mixed_precision(precision)
        model = tiny_lora_model()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
        prepared, opt = accelerator.prepare(model, opt)
        sync_plans(prepared, n_tokens=LOCAL_BATCH * SEQ)
        seen_dtypes.clear()
        for batch in global_batches():
            ids = local_rows(batch, rank)
            with accelerator.autocast():
                loss = prepared(input_ids=ids, labels=ids).loss
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
        results[precision] = {
            "lora": lora_state(prepared),
            "ac_wrappers": sum("Checkpoint" in type(m).__name__ for m in prepared.modules()),
            "x_dtypes": set(seen_dtypes),
        }
        if precision == "no":
            # PEFT's own save_pretrained would write each rank's shards: save_adapter gathers
            save_adapter(prepared, out / "adapter")
    torch.save(results, out / f"rank{rank}.pt")


def _failing_rank(rank: int, out: Path) -> None:
    """What the harness does with a rank that raises while its peer waits in a collective; the
    model is a RunLoRALinear (no PEFT import: the test is of the harness, not the model)."""
    from runlora import RunLoRALinear

    torch.manual_seed(0)
    model = RunLoRALinear(torch.nn.Linear(SEQ, SEQ), r=4, lora_alpha=8, init_lora_weights=False)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for step, batch in enumerate(global_batches()):
        if rank == 1 and step == 1:
            raise ValueError(f"bad batch on rank {rank} at step {step}")
        x = local_rows(batch, rank).float()
        ddp(x).square().mean().backward()  # rank 0 then waits in all-reduce
        opt.step()
        opt.zero_grad()


def _deepspeed(rank: int, out: Path) -> None:
    """ZeRO-2, ZeRO-3, and ZeRO-3 with the base built partitioned (``zero.Init``), fp32."""
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(WORLD))
    import deepspeed

    from runlora.integrations.distributed import save_adapter, sync_plans

    def full(p):
        with deepspeed.zero.GatheredParameters([p]) if hasattr(p, "ds_id") else _nothing():
            return p.detach().clone()

    results = {}
    for label, stage in DEEPSPEED_RUNS:
        config = {
            "train_micro_batch_size_per_gpu": LOCAL_BATCH,
            "gradient_accumulation_steps": 1,
            # threshold 0: partition every tensor (by default ZeRO-3 keeps small ones whole)
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
            "zero_allow_untested_optimizer": True,  # plain SGD, as in the reference
            "gradient_clipping": 0.0,  # DeepSpeed clips to 1.0 unless told
        }
        model = tiny_lora_model()
        if label in ("zero3_init", "zero3_patched"):
            model = _other_build(label, model, config)
        n_layers = len(lora_layers(model))
        q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
        partitioned = hasattr(q_proj.base_layer.weight, "ds_id")
        frozen_before = {n: full(p) for n, p in model.named_parameters() if not p.requires_grad}
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        plans = sync_plans(engine, n_tokens=LOCAL_BATCH * SEQ)  # reads partitioned shapes
        losses = []
        for batch in global_batches():
            ids = local_rows(batch, rank)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        lora = {n: full(p).cpu() for n, p in model.named_parameters() if p.requires_grad}
        frozen_same = all(
            torch.equal(full(p), frozen_before[n])
            for n, p in model.named_parameters()
            if not p.requires_grad
        )
        results[label] = {
            "losses": losses,
            "lora": lora,
            "frozen_same": frozen_same,
            "n_frozen": len(frozen_before),
            "built_partitioned": partitioned,
            "plans": {repr(k): v.to_dict() for k, v in plans.items()},
            "plan_shapes": {
                (k.problem.in_features, k.problem.out_features, k.problem.r) for k in plans
            },
            "n_lora_layers": n_layers,
        }
        if label == "zero3":
            save_adapter(engine, out / "adapter")
        del engine
    torch.save(results, out / f"rank{rank}.pt")


DEEPSPEED_RUNS = (("zero2", 2), ("zero3", 3), ("zero3_init", 3), ("zero3_patched", 3))


def _other_build(label: str, reference, config: dict):
    """The reference model built another way, with the reference's values: its base born
    partitioned (as ``from_pretrained`` under ZeRO-3 builds it), or by PEFT's own
    ``get_peft_model`` under ``runlora.patch_peft()``."""
    import deepspeed
    import peft

    import runlora
    from runlora import LoraConfig, get_runlora_model

    if label == "zero3_init":
        with deepspeed.zero.Init(config_dict_or_path=config):
            base = tiny_base()
        model = get_runlora_model(base, LoraConfig(**_LORA_KWARGS))
    else:
        with runlora.patch_peft():
            model = peft.get_peft_model(tiny_base(), peft.LoraConfig(**_LORA_KWARGS))
    wanted = dict(reference.named_parameters())
    assert wanted.keys() == dict(model.named_parameters()).keys()
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            p.data.copy_(wanted[name])
    return model


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _abort_after_results(rank: int, out: Path) -> None:
    torch.save({"rank": rank}, out / f"rank{rank}.pt")
    dist.barrier()
    if rank == 1:
        os.abort()  # SIGABRT, as gloo's teardown does now and then


def _abort_before_results(rank: int, out: Path) -> None:
    if rank == 1:
        os.abort()
    torch.save({"rank": rank}, out / f"rank{rank}.pt")


SCENARIOS = {
    "ddp_and_plans": _ddp_and_plans,
    "fsdp": _fsdp,
    "failing_rank": _failing_rank,
    "deepspeed": _deepspeed,
    "accelerate_fsdp2": _accelerate_fsdp2,
    "abort_after_results": _abort_after_results,
    "abort_before_results": _abort_before_results,
}


# --- parent side --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(scenario: str, out: Path, timeout_s: float = JOB_TIMEOUT_S) -> None:
    """Run ``scenario`` on WORLD spawned ranks; re-raises a rank's exception, never hangs."""
    os.environ["RUNLORA_CACHE_DIR"] = str(out / "cache")  # inherited by the ranks
    context = mp.start_processes(
        _worker,
        args=(scenario, _free_port(), str(out)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"{scenario}: ranks still running after {timeout_s} s (a hang)")
    except mp.ProcessExitedException as err:
        # gloo now and then aborts a rank while its process group is torn down (RESULTS.md,
        # "A rank aborting at the end of a run"). Once every rank has written its results the
        # scenario's work is done and the test checks it; an abort before that fails.
        finished = all((out / f"rank{r}.pt").is_file() for r in range(WORLD))
        if err.signal_name != "SIGABRT" or not finished:
            raise
        warnings.warn(
            f"{scenario}: rank {err.error_index} aborted (SIGABRT) while shutting down, after "
            "every rank had written its results",
            stacklevel=2,
        )
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)


def rank_results(out: Path) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    """LoRA weights of one process that sees every global batch whole."""
    torch.manual_seed(0)
    model = tiny_lora_model()
    initial = lora_state(model)
    train(model, global_batches(), rank=None)
    return {"initial": initial, "trained": lora_state(model)}


def assert_same_lora(actual: dict, reference: dict, atol: float, label: str) -> None:
    assert actual.keys() == reference["trained"].keys(), label
    for name, want in reference["trained"].items():
        moved = (want - reference["initial"][name]).abs().max().item()
        assert moved > 1e-3, f"{name} did not train ({moved}); the comparison would be empty"
        err = (actual[name] - want).abs().max().item()
        assert err <= atol, f"{label}: {name} differs from one process by {err:.3g}"


def test_ddp_trains_like_one_process_and_ranks_share_plans(tmp_path, reference):
    run_job("ddp_and_plans", tmp_path)
    ranks = rank_results(tmp_path)
    for r, res in enumerate(ranks):
        assert_same_lora(res["lora"], reference, ATOL, f"DDP rank {r}")
    assert ranks[0]["plans"] == ranks[1]["plans"] and ranks[0]["plans"]
    assert all(p["criterion"] == "roofline" for p in ranks[0]["plans"].values())
    assert ranks[0]["used"] == ranks[1]["used"]
    assert_saved_like(tmp_path / "adapter", reference)
    cache = json.loads((tmp_path / "cache" / "plans.json").read_text())
    assert cache["format"] == "runlora-plan-cache" and len(cache["plans"]) >= 1
    shared = json.loads((tmp_path / "shared_cache" / "plans.json").read_text())
    assert set(shared["plans"]) == {f"rank{r}-entry{i}" for r in range(WORLD) for i in range(20)}


def test_fsdp2_trains_like_one_process_frozen_shards_untouched(tmp_path, reference):
    run_job("fsdp", tmp_path)
    ranks = rank_results(tmp_path)
    for r, res in enumerate(ranks):
        for label in ("fp32", "fp32_ckpt"):
            run = res[label]
            assert_same_lora(run["lora"], reference, ATOL, f"FSDP2 {label} rank {r}")
            assert run["frozen_same"] and run["n_frozen"] > 0
            # the op sees the all-gathered plain Parameter itself: no DTensor, no copy, frozen
            assert run["seen"] and all(s[:3] == (False, False, True) for s in run["seen"])
        bf16 = res["bf16"]
        assert all(s[3] == torch.bfloat16 for s in bf16["seen"])
        assert bf16["frozen_same"]
        for name, want in reference["trained"].items():  # bf16 compute, fp32 params
            assert (bf16["lora"][name] - want).abs().max().item() < 5e-2, name
    assert_saved_like(tmp_path / "adapter", reference)
    assert sorted(p.name for p in tmp_path.iterdir() if "adapter" in p.name) == ["adapter"]


def assert_saved_like(directory: Path, reference: dict) -> None:
    """``directory`` holds one PEFT adapter: PEFT's config and keys (no adapter name, no
    ``_checkpoint_wrapped_module``, no FSDP prefix), the full trained tensors, and stock PEFT
    (``PeftModel.from_pretrained``, no runlora) loads it into a fresh base with those values."""
    import peft
    from safetensors.torch import load_file

    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == sorted(TARGETS)
    saved = load_file(str(directory / "adapter_model.safetensors"))
    trained = {k.replace(".default.", "."): v for k, v in reference["trained"].items()}
    assert saved.keys() == trained.keys()
    for key, value in saved.items():
        assert (value - trained[key]).abs().max().item() <= ATOL, key
    loaded = peft.PeftModel.from_pretrained(tiny_base(), directory, is_trainable=True)
    assert isinstance(loaded, peft.PeftModel)
    assert_same_lora(lora_state(loaded), reference, ATOL, f"stock PEFT loading {directory.name}")


def test_accelerate_fsdp2_prepare_with_activation_checkpointing(tmp_path, reference):
    """The shipped fsdp2.yaml through accelerate's FSDP2 preparation: LoRA weights equal one
    process's (fp32; bf16 within its precision, the op computing in bf16), and the saved adapter
    has PEFT's keys (no ``_checkpoint_wrapped_module``)."""
    pytest.importorskip("accelerate")
    run_job("accelerate_fsdp2", tmp_path)
    for r, res in enumerate(rank_results(tmp_path)):
        for precision, run in res.items():
            assert run["ac_wrappers"] == 2, precision  # both decoder layers checkpointed
            lora = {k.replace("._checkpoint_wrapped_module", ""): v for k, v in run["lora"].items()}
            if precision == "no":
                assert run["x_dtypes"] == {torch.float32}
                assert_same_lora(lora, reference, ATOL, f"accelerate FSDP2 rank {r}")
            else:
                assert run["x_dtypes"] == {torch.bfloat16}, precision
                for name, want in reference["trained"].items():  # fp32 params, bf16 compute
                    assert (lora[name] - want).abs().max().item() < 5e-2, name
    assert_saved_like(tmp_path / "adapter", reference)


def test_deepspeed_zero2_and_zero3_train_like_one_process(tmp_path, reference):
    """DeepSpeed ZeRO-2/3 (CPU accelerator, gloo): runlora's layers read partitioned weights
    through ZeRO-3's external-parameter hooks, also with a base built under ``zero.Init`` and for
    a model built by PEFT's ``get_peft_model`` under ``runlora.patch_peft()``."""
    pytest.importorskip("deepspeed")
    run_job("deepspeed", tmp_path, timeout_s=JOB_TIMEOUT_S * 4)  # first use builds DeepSpeed's op
    ranks = rank_results(tmp_path)
    for r, res in enumerate(ranks):
        for label, _ in DEEPSPEED_RUNS:
            run = res[label]
            assert_same_lora(run["lora"], reference, ATOL, f"DeepSpeed {label} rank {r}")
            assert run["frozen_same"] and run["n_frozen"] > 0, label
            assert run["n_lora_layers"] == N_LORA_LAYERS, label
        assert res["zero3_init"]["built_partitioned"] and not res["zero3"]["built_partitioned"]
        for label, _ in DEEPSPEED_RUNS:
            # sync_plans read the full (in, out, r) of partitioned adapters; ranks agree
            assert res[label]["plan_shapes"] == {(64, 64, 4), (64, 176, 4), (176, 64, 4)}, label
            assert res[label]["plans"] == ranks[0][label]["plans"], label
    assert_saved_like(tmp_path / "adapter", reference)


def test_an_abort_counts_only_after_every_rank_wrote_its_results(tmp_path):
    for sub in ("after", "before"):
        (tmp_path / sub).mkdir()
    with pytest.warns(UserWarning, match="aborted .SIGABRT. while shutting down"):
        run_job("abort_after_results", tmp_path / "after")
    assert [r["rank"] for r in rank_results(tmp_path / "after")] == [0, 1]
    with pytest.raises(mp.ProcessExitedException, match="SIGABRT"):
        run_job("abort_before_results", tmp_path / "before", timeout_s=60)


def test_a_failing_rank_ends_the_job_with_its_error(tmp_path):
    start = time.monotonic()
    with pytest.raises(Exception, match="bad batch on rank 1 at step 1"):
        run_job("failing_rank", tmp_path, timeout_s=60)
    assert time.monotonic() - start < 60


# --- in one process -------------------------------------------------------------------------


def test_plan_requests_are_the_distinct_layer_shapes():
    from runlora.integrations.distributed import plan_requests, sync_plans
    from runlora.planning.request import bucket_tokens

    model = tiny_lora_model()
    requests = plan_requests(model, n_tokens=LOCAL_BATCH * SEQ)
    shapes = {(q.problem.in_features, q.problem.out_features) for q in requests}
    assert shapes == {(64, 64), (64, 176), (176, 64)}
    assert len(requests) == 6 and {q.problem.needs_input_grad for q in requests} == {True, False}
    assert {(q.dtype, q.device, q.problem.n) for q in requests} == {
        (torch.float32, "cpu", bucket_tokens(LOCAL_BATCH * SEQ))
    }
    assert sync_plans(model, n_tokens=LOCAL_BATCH * SEQ).keys() == set(requests)  # no group
    bf16 = plan_requests(model, n_tokens=LOCAL_BATCH * SEQ, dtype=torch.bfloat16)
    assert {q.dtype for q in bf16} == {torch.bfloat16}


def test_installed_plans_are_used_without_measuring(tmp_path, monkeypatch):
    import runlora.planning.roofline
    from runlora.integrations.distributed import PlanRequest
    from runlora.planning.planner import (
        Plan,
        clear_plan_memo,
        install_plans,
        plan_bucketed,
        plan_for,
    )

    monkeypatch.setenv("RUNLORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(
        runlora.planning.roofline, "time_call", lambda *a, **k: pytest.fail("measured")
    )
    request = PlanRequest.for_call(37, 48, 80, 4, criterion="roofline", needs_input_grad=False)
    chosen = Plan("lowrank_first", "gradient_split", "autograd", criterion="roofline")
    try:
        assert install_plans([(request.to_dict(), chosen.to_dict())]) == 1
        assert plan_bucketed(request) == chosen
        assert plan_for(37, 48, 80, 4, criterion="roofline", needs_input_grad=False) == chosen
    finally:
        clear_plan_memo()


def test_save_adapter_unwraps_deepspeed_engines_and_their_subclasses():
    from torch import nn

    from runlora.integrations.distributed import _unwrap

    class DeepSpeedEngine(nn.Module):  # stands in for deepspeed's, matched by name
        def __init__(self, module):
            super().__init__()
            self.module = module

    class PipelineEngine(DeepSpeedEngine):
        pass

    model = tiny_lora_model()
    assert _unwrap(DeepSpeedEngine(model)) is model
    assert _unwrap(PipelineEngine(model)) is model
    assert _unwrap(model) is model


def test_shutdown_without_a_process_group_does_nothing():
    from runlora.integrations.distributed import shutdown

    assert not dist.is_initialized()
    shutdown()
    assert not dist.is_initialized()


def test_plan_requests_see_the_layers_runlora_runs():
    """A plain PEFT model's layers run PEFT's forward: nothing to plan until ``from_peft``
    switches them; a layer with a fixed ``plan`` plans nothing either."""
    import peft

    from runlora import from_peft
    from runlora.integrations.distributed import plan_requests

    n_tokens = LOCAL_BATCH * SEQ
    plain = peft.get_peft_model(tiny_base(), peft.LoraConfig(**_LORA_KWARGS))
    assert plan_requests(plain, n_tokens) == []
    from_peft(plain)
    assert plan_requests(plain, n_tokens) == plan_requests(tiny_lora_model(), n_tokens)
    from runlora.planning.planner import Plan

    for name, layer in lora_layers(plain).items():
        if not name.endswith("down_proj"):
            layer.plan = Plan("sequential", "B1")
    shapes = {
        (q.problem.in_features, q.problem.out_features) for q in plan_requests(plain, n_tokens)
    }
    assert shapes == {(176, 64)}


def test_save_adapter_in_one_process_writes_what_peft_writes(tmp_path):
    from safetensors.torch import load_file
    from torch import nn

    from runlora.integrations.distributed import save_adapter

    model = tiny_lora_model()
    assert save_adapter(model, tmp_path / "ours") == tmp_path / "ours"
    model.save_pretrained(tmp_path / "peft")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and len(ours) == 2 * N_LORA_LAYERS
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert ours_config == json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]  # no temporary directory left behind
    with pytest.raises(TypeError, match="adapter 'other'"):
        save_adapter(model, tmp_path / "x", adapter_name="other")
    with pytest.raises(TypeError, match="needs a peft.PeftModel"):
        save_adapter(nn.Linear(2, 2), tmp_path / "x")


@pytest.mark.parametrize("use_dora", [False, True])
def test_plan_requests_cover_what_a_training_step_plans(monkeypatch, use_dora):
    """What ``sync_plans`` would send is what the layers ask for in a training step, with
    dropout (DoRA plans its LoRA pair without it) and without."""
    import peft

    import runlora.planning.planner as planner
    from runlora import from_peft
    from runlora.integrations.distributed import plan_requests

    kwargs = {**_LORA_KWARGS, "lora_dropout": 0.1, "use_dora": use_dora}
    model = from_peft(peft.get_peft_model(tiny_base(), peft.LoraConfig(**kwargs))).train()
    planner.clear_plan_memo()
    asked = []
    real = planner.plan_request
    monkeypatch.setattr(planner, "plan_request", lambda q: asked.append(q) or real(q))
    ids = torch.randint(0, 100, (LOCAL_BATCH, SEQ))
    model(input_ids=ids, labels=ids).loss.backward()
    assert asked
    synced = set(plan_requests(model, LOCAL_BATCH * SEQ))
    assert {q.bucketed() for q in asked} <= synced


@pytest.mark.parametrize("extra_on", [0, 1])
def test_ranks_planning_different_numbers_of_shapes_get_a_clear_error(monkeypatch, extra_on):
    """One rank's requests a prefix of another's: a RuntimeError naming both counts and what
    to do, not a bare StopIteration (the gather is stubbed: 2 ranks)."""
    import runlora.integrations.distributed as distributed
    from runlora.planning.planner import Plan
    from runlora.planning.request import PlanRequest

    plan = Plan("sequential", "recompute_split", criterion="flops")
    one = {PlanRequest.for_call(64, 32, 48, 4): plan}
    two = {**one, PlanRequest.for_call(64, 48, 32, 4): plan}
    per_rank = [two, one] if extra_on == 0 else [one, two]

    def gather(out, mine, group=None):
        for i, result in enumerate(per_rank):
            out[i] = [
                (dict(distributed._across_ranks(q.to_dict())), distributed._signature(p))
                for q, p in result.items()
            ]

    monkeypatch.setattr(distributed.dist, "all_gather_object", gather)
    with pytest.raises(RuntimeError, match=r"plans \d layer shapes, rank 0 \d.*same LoraConfig"):
        distributed._check_same_plans(per_rank[0], 0, 2, 0, None)

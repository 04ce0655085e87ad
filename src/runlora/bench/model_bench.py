"""``runlora bench``: the training step of a whole model, runlora against PEFT and the frozen floor.

Arms, all built on one randomly initialised model whose weights they share (each arm is a deep
copy of the module tree that reuses the same parameter tensors, so no weight exists twice):

    floor            every weight frozen, ``enable_input_require_grads``: what any exact LoRA
                     must at least pay (the backward still flows through every layer)
    peft             ``peft.get_peft_model`` with the same LoraConfig fields
    runlora/<crit>   ``runlora.get_runlora_model``, one arm per planning criterion

With ``quant`` 4bit/8bit the shared base model's linear layers (all but the head) are
quantized with ``runlora.layers.quant.quantize_model`` first, so every arm runs on the same
packed W.

The step is forward + loss + backward on a fixed random batch (token ids with the LM loss, or
pixels and labels). Arms run interleaved (``runlora.bench.harness``); memory is measured on one
extra untimed step per arm (``runlora.bench.memory``: bytes saved for backward, peak memory).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import configs
from ..ops.checks import dropout_probability, name_matches, positive_int
from .harness import (
    DTYPES,
    Arm,
    ArmResult,
    BenchError,
    Clock,
    check_run,
    mean_ratio,
    measure_arms,
    round_ratio_median,
    timing_of,
)
from .memory import MIB, PEAK_KINDS, storage_ptrs
from .report import bar_panels, environment, fmt, text_table, write_csv_json

__all__ = [
    "BenchSettings",
    "ConfigResult",
    "summarize",
    "build_arms",
    "bench_model",
    "run_bench",
    "format_table",
    "write_outputs",
]

QUANT = ("none", "4bit", "8bit")


@dataclass(frozen=True)
class BenchSettings:
    """One benchmark job, applied to every model given.

    ``target_modules`` None means every linear layer of the transformer blocks
    (``runlora.configs.default_target_modules``).
    """

    batch_size: int = 4
    seq_len: int = 256
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    dtype: str = "fp32"
    target_modules: tuple[str, ...] | None = None
    criterions: tuple[str, ...] = ("flops",)
    min_run_time: float = 15.0
    warmup_rounds: int = 2
    min_rounds: int = 5
    max_rounds: int = 10_000
    device: str = "cpu"
    quant: str = "none"
    seed: int = 0
    dora: bool = False
    fused: bool = False

    def check(self) -> None:
        """Raise ValueError, with what to do, on any setting that cannot run."""
        for name in ("batch_size", "seq_len", "r"):
            positive_int(name.replace("_", " "), getattr(self, name))
        dropout_probability("lora dropout", self.lora_dropout)
        check_run(dtype=self.dtype, criterions=self.criterions, **timing_of(self))
        if self.quant not in QUANT:
            raise BenchError(f"--quant must be one of {', '.join(QUANT)}, got {self.quant!r}")
        if self.quant != "none":
            from ..layers.quant import require_bitsandbytes

            try:
                require_bitsandbytes()
            except ImportError as err:
                raise BenchError(f"--quant {self.quant}: {err}") from None

    def check_model(self, config) -> None:
        """Raise ValueError if the settings do not fit this model config."""
        limit = configs.max_seq_len(config)
        if limit is not None and self.seq_len > limit:
            raise BenchError(
                f"--seq-len {self.seq_len} is above {config.name_or_path}'s max_position_"
                f"embeddings ({limit}); use --seq-len {limit} or less"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def summarize(arms: list[ArmResult]) -> list[dict]:
    """One row per arm with the derived columns.

    ``x_floor`` = mean step / the floor arm's, ``x_floor_median`` the median of the per-round
    ratios (``x_peft_median`` likewise against PEFT); ``speedup_vs_peft_pct`` = (PEFT − arm) /
    PEFT · 100 on mean step time (the RunLoRA paper's "Speedup, %"); ``*_vs_peft_mib`` =
    PEFT's figure minus the arm's (positive: the arm needs less). None where the reference
    arm is missing.
    """
    by_kind = {a.kind: a for a in arms}
    by_name = {a.name: a for a in arms}
    floor, peft = by_kind.get("floor"), by_kind.get("peft")

    def diff_mib(ref: int | None, value: int | None) -> float | None:
        return None if ref is None or value is None else (ref - value) / MIB

    rows = []
    for a in arms:
        vs_peft = peft if a is not peft else None
        rows.append(
            {
                "arm": a.name,
                "kind": a.kind,
                "steps": len(a.times_ms),
                "ms_mean": a.mean_ms,
                "ms_std": a.std_ms,
                "ms_median": a.median_ms,
                "x_floor": mean_ratio(a, floor),
                "x_floor_median": round_ratio_median(a, floor),
                "x_peft_median": round_ratio_median(a, vs_peft),
                "speedup_vs_peft_pct": (
                    (peft.mean_ms - a.mean_ms) / peft.mean_ms * 100 if vs_peft else None
                ),
                "saved_mib": a.saved_bytes / MIB,
                "saved_vs_peft_mib": diff_mib(peft.saved_bytes, a.saved_bytes) if vs_peft else None,
                "peak_mib": None if a.peak_bytes is None else a.peak_bytes / MIB,
                "peak_vs_peft_mib": diff_mib(peft.peak_bytes, a.peak_bytes) if vs_peft else None,
                "peak_kind": a.peak_kind,
                "trainable_params": a.trainable_params,
                "loss": a.loss,
                # DoRA arms (--dora): against the same engine's LoRA arm, and against PEFT's DoRA
                "x_lora_median": round_ratio_median(a, by_name.get(_lora_twin(a.name))),
                "saved_x_lora": _saved_ratio(a, by_name.get(_lora_twin(a.name))),
                "x_peft_dora_median": (
                    round_ratio_median(a, by_name.get("peft_dora"))
                    if a.kind == "runlora_dora"
                    else None
                ),
            }
        )
    return rows


def _lora_twin(name: str) -> str | None:
    """The LoRA arm a DoRA arm is compared with: ``peft_dora`` -> ``peft``,
    ``runlora_dora[_lowmem]/<criterion>`` -> ``runlora/<criterion>``."""
    if name == "peft_dora":
        return "peft"
    head, _, criterion = name.partition("/")
    return f"runlora/{criterion}" if head in ("runlora_dora", "runlora_dora_lowmem") else None


def _saved_ratio(arm: ArmResult, ref: ArmResult | None) -> float | None:
    return None if ref is None or not ref.saved_bytes else arm.saved_bytes / ref.saved_bytes


@dataclass
class ConfigResult:
    """The arms measured on one model."""

    model: str
    model_type: str
    n_params: int
    tokens_per_step: int
    rounds: int
    arms: list[ArmResult] = field(default_factory=list)

    def rows(self) -> list[dict]:
        return summarize(self.arms)


# --- building the arms on a model ---------------------------------------------------------


def _make_batch(config, task: str, settings: BenchSettings) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(settings.seed)
    b, t = settings.batch_size, settings.seq_len
    if task == "image_classification":
        size, channels = config.image_size, config.num_channels
        batch = {
            "pixel_values": torch.randn(b, channels, size, size, generator=gen),
            "labels": torch.randint(0, config.num_labels, (b,), generator=gen),
        }
    else:
        ids = torch.randint(0, config.vocab_size, (b, t), generator=gen)
        labels = (
            ids
            if task != "sequence_classification"
            else torch.randint(0, config.num_labels, (b,), generator=gen)
        )
        batch = {"input_ids": ids, "labels": labels}
    out = {}
    for k, v in batch.items():
        v = v.to(settings.device)
        out[k] = v.to(settings.torch_dtype) if v.is_floating_point() else v
    return out


def _tokens_per_step(config, task: str, settings: BenchSettings) -> int:
    if task == "image_classification":
        return settings.batch_size * ((config.image_size // config.patch_size) ** 2 + 1)
    return settings.batch_size * settings.seq_len


def _weight_sharing_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the module tree whose parameters and buffers are the original tensors."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    # bitsandbytes' 8-bit layers keep their row scales in a MatmulLtState that the first forward
    # fills: share it too, or each copy would see a different (or empty) state.
    for module in model.modules():
        state = getattr(module, "state", None)
        if type(state).__name__ == "MatmulLtState":
            memo[id(state)] = state
    return copy.deepcopy(model, memo)


def _check_targets(model: nn.Module, targets: list[str], label: str) -> None:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    missing = [t for t in targets if not any(name_matches(n, t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise BenchError(
            f"target module {missing[0]!r} matches no linear layer of {label}; "
            f"its linear layers are named: {', '.join(leaves)}"
        )


def _step(model: nn.Module, batch: dict, trainable: list[nn.Parameter]) -> Callable[[], object]:
    def step() -> torch.Tensor:
        for p in trainable:
            p.grad = None
        loss = model(**batch).loss
        loss.backward()
        return loss

    return step


def build_arms(
    model: nn.Module, batch: dict, settings: BenchSettings, targets: list[str]
) -> list[Arm]:
    """The floor, PEFT and one runlora arm per criterion, sharing ``model``'s weights; with
    ``settings.fused`` the split of the default's gain: runlora without shared-input fusion
    (``runlora_unfused/...``: inputs recomputed, each layer its own op) and without either
    (``runlora_saved/...``: inputs saved too);
    with ``settings.dora`` also PEFT's DoRA (``peft_dora``) and runlora's, saving the unscaled
    output for dm (``runlora_dora/<criterion>``) and recomputing it (``runlora_dora_lowmem/...``).
    """
    import peft

    from ..config import LoraConfig
    from ..integrations.peft import describe, from_peft, get_runlora_model

    model.requires_grad_(False)
    exclude = storage_ptrs((*model.parameters(), *model.buffers()))

    def arm(name: str, kind: str, wrapped: nn.Module) -> Arm:
        trainable = [p for p in wrapped.parameters() if p.requires_grad]
        every = storage_ptrs((*wrapped.parameters(), *wrapped.buffers()))
        return Arm(
            name,
            kind,
            _step(wrapped, batch, trainable),
            exclude | every,
            sum(p.numel() for p in trainable),
        )

    floor = _weight_sharing_copy(model)
    floor.enable_input_require_grads()
    arms = [arm("floor", "floor", floor)]
    peft_config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=list(targets),
        bias="none",
    )
    # Adapters in the model's dtype, as runlora keeps them (PEFT's default would upcast to fp32).
    peft_model = peft.get_peft_model(
        _weight_sharing_copy(model), peft_config, autocast_adapter_dtype=False
    )
    arms.append(arm("peft", "peft", peft_model))
    if settings.dora:
        dora_config = dataclasses.replace(peft_config, use_dora=True)
        peft_dora = peft.get_peft_model(
            _weight_sharing_copy(model), dora_config, autocast_adapter_dtype=False
        )
        arms.append(arm("peft_dora", "peft_dora", peft_dora))
    variants = [("runlora", False, True)]
    if settings.fused:  # the split of the gain: inputs saved, recomputed, recomputed and fused
        variants += [("runlora_unfused", False, True), ("runlora_saved", False, True)]
    if settings.dora:
        variants += [("runlora_dora", True, True), ("runlora_dora_lowmem", True, False)]
    for criterion in settings.criterions:
        for head, use_dora, save_output in variants:
            config = LoraConfig(
                r=settings.r,
                lora_alpha=settings.lora_alpha,
                lora_dropout=settings.lora_dropout,
                target_modules=list(targets),
                criterion=criterion,
                use_dora=use_dora,
            )
            wrapped = get_runlora_model(
                _weight_sharing_copy(model), config, autocast_adapter_dtype=False
            )
            name = f"{head}/{criterion}"
            # A layer left on PEFT's forward would time PEFT under runlora's name.
            slow = [row for row in describe(wrapped, file=None) if row.engine != "runlora"]
            if slow:
                raise BenchError(
                    f"{name}: {len(slow)} LoRA layers would run PEFT's forward, not "
                    f"runlora's op ({slow[0].name}: {slow[0].detail}); leave them out of "
                    "--target-modules"
                )
            if use_dora:
                from_peft(wrapped, criterion=criterion, dora_save_output=save_output)
            if head == "runlora_unfused":
                from_peft(wrapped, criterion=criterion, fuse=False)
            if head == "runlora_saved":
                from_peft(wrapped, criterion=criterion, fuse=False, recompute_inputs=False)
            arms.append(arm(name, "runlora_dora" if use_dora else "runlora", wrapped))
    return arms


def bench_model(
    name_or_path: str,
    settings: BenchSettings,
    *,
    clock: Clock = time.perf_counter,
    progress: bool = False,
) -> ConfigResult:
    """Build ``name_or_path`` once (random init), wrap it in every arm and measure them."""
    config = configs.load_config(name_or_path)
    settings.check_model(config)
    if hasattr(config, "use_cache"):
        config.use_cache = False
    task = configs.default_task(config)
    model = configs.build_model(
        config, dtype=settings.torch_dtype, device=settings.device, seed=settings.seed
    )
    targets = list(settings.target_modules or configs.default_target_modules(model))
    _check_targets(model, targets, name_or_path)
    n_params = sum(p.numel() for p in model.parameters())
    if settings.quant != "none":
        from ..layers.quant import quantize_model

        quantize_model(model, int(settings.quant[0]), compute_dtype=settings.torch_dtype)
    batch = _make_batch(config, task, settings)
    arms = build_arms(model, batch, settings, targets)
    results = measure_arms(
        arms,
        **timing_of(settings),
        clock=clock,
        progress=progress,
        desc=name_or_path,
    )
    return ConfigResult(
        name_or_path,
        config.model_type,
        n_params,
        _tokens_per_step(config, task, settings),
        len(results[0].times_ms),
        results,
    )


def run_bench(
    models: list[str],
    settings: BenchSettings,
    *,
    clock: Clock = time.perf_counter,
    progress: bool = False,
) -> list[ConfigResult]:
    """``bench_model`` for each model, after checking every model's config first (so a bad
    ``--seq-len`` for the last model fails before the first one runs)."""
    settings.check()
    for name in models:
        settings.check_model(configs.load_config(name))
    results = []
    for name in models:
        torch.manual_seed(settings.seed)
        results.append(bench_model(name, settings, clock=clock, progress=progress))
        gc.collect()
    return results


# --- reporting ----------------------------------------------------------------------------


def _describe(settings: BenchSettings) -> str:
    return (
        f"batch {settings.batch_size} x {settings.seq_len}, r={settings.r}, "
        f"alpha={settings.lora_alpha:g}, dropout={settings.lora_dropout:g}, "
        f"{settings.dtype}, {settings.device}"
    )


def format_table(results: list[ConfigResult], settings: BenchSettings) -> str:
    """The stdout table: one block per model, one line per arm."""
    head = [
        "arm",
        "ms/step",
        "± std",
        "x floor",
        "speedup vs PEFT",
        "saved MiB",
        "saved vs PEFT",
        "peak MiB",
        "peak vs PEFT",
    ]
    lines = [f"runlora bench: {_describe(settings)}"]
    for res in results:
        rows = res.rows()
        peak_kind = next((r["peak_kind"] for r in rows if r["peak_kind"]), None)
        lines.append("")
        lines.append(
            f"{res.model} ({res.model_type}, {res.n_params / 1e6:.1f}M params, "
            f"{res.tokens_per_step} tokens/step, {res.rounds} timed rounds)"
        )
        body = [
            [
                r["arm"],
                fmt(r["ms_mean"], ".1f"),
                fmt(r["ms_std"], ".1f"),
                fmt(r["x_floor"], ".3f"),
                fmt(r["speedup_vs_peft_pct"], "+.1f", " %"),
                fmt(r["saved_mib"], ".1f"),
                fmt(r["saved_vs_peft_mib"], "+.1f"),
                fmt(r["peak_mib"], ".1f"),
                fmt(r["peak_vs_peft_mib"], "+.1f"),
            ]
            for r in rows
        ]
        lines += ["  " + line for line in text_table(head, body)]
        if peak_kind:
            lines.append(f"  peak: {PEAK_KINDS[peak_kind]}")
        # DoRA arms train a magnitude vector more than the LoRA arms: compare within each family
        for family in (False, True):
            counts = {
                r["arm"]: r["trainable_params"]
                for r in rows
                if r["kind"] != "floor" and ("dora" in r["kind"]) == family
            }
            if len(set(counts.values())) <= 1:
                continue
            lines.append(
                "  WARNING: the arms train different parameter counts ("
                + ", ".join(f"{k} {v}" for k, v in counts.items())
                + "): they do not adapt the same layers"
            )
        dora = [r for r in rows if r["x_lora_median"] is not None]
        if dora:
            lines.append("  DoRA, medians of per-round ratios:")
            dora_head = ["arm", "x its LoRA", "x PEFT DoRA", "saved x its LoRA"]
            dora_body = [
                [
                    r["arm"],
                    fmt(r["x_lora_median"], ".3f"),
                    fmt(r["x_peft_dora_median"], ".3f"),
                    fmt(r["saved_x_lora"], ".3f"),
                ]
                for r in dora
            ]
            lines += ["  " + line for line in text_table(dora_head, dora_body)]
    lines.append("")
    lines.append(
        "speedup vs PEFT = (PEFT - arm) / PEFT on mean step time; "
        "'vs PEFT' memory columns are PEFT minus arm (positive: arm uses less); "
        "saved = bytes saved for backward, parameters excluded."
    )
    return "\n".join(lines)


def write_outputs(
    results: list[ConfigResult], settings: BenchSettings, prefix: str | Path, *, plot: bool = True
) -> list[Path]:
    """PREFIX.csv (one row per model and arm), PREFIX.json (settings, environment, every step
    time) and, with ``plot`` (needs matplotlib), PREFIX.png (speedup and memory saved vs PEFT
    per model). Returns the paths written."""
    prefix = Path(prefix)
    setting_cols = {
        k: v
        for k, v in asdict(settings).items()
        if k not in ("target_modules", "criterions", "max_rounds")
    }
    rows = [
        {
            "model": res.model,
            "n_params": res.n_params,
            "tokens_per_step": res.tokens_per_step,
            **setting_cols,
            **row,
        }
        for res in results
        for row in res.rows()
    ]
    doc = {
        "settings": asdict(settings),
        "environment": environment(settings.device),
        "peak_kinds": PEAK_KINDS,
        "results": [
            {
                "model": res.model,
                "model_type": res.model_type,
                "n_params": res.n_params,
                "tokens_per_step": res.tokens_per_step,
                "rounds": res.rounds,
                "rows": res.rows(),
                "times_ms": {a.name: a.times_ms for a in res.arms},
            }
            for res in results
        ],
    }
    paths = list(write_csv_json(prefix, rows, doc))
    if plot:
        paths.append(prefix.with_name(prefix.name + ".png"))
        write_plot(results, settings, paths[-1])
    return paths


def write_plot(results: list[ConfigResult], settings: BenchSettings, path: Path) -> None:
    """Two panels, one group of bars per model and one bar per arm (PEFT's is the zero line):
    step-time speedup over PEFT (%) and bytes saved for backward, in MiB less than PEFT's."""
    arm_names = [a.name for a in results[0].arms if a.kind != "peft"]
    rows = [{r["arm"]: r for r in res.rows()} for res in results]

    def column(key: str) -> dict[str, list[float]]:
        return {name: [by.get(name, {}).get(key) or 0.0 for by in rows] for name in arm_names}

    bar_panels(
        path,
        [res.model for res in results],
        [
            ("step time: speedup over PEFT (%)", column("speedup_vs_peft_pct")),
            ("saved for backward: MiB less than PEFT", column("saved_vs_peft_mib")),
        ],
        f"runlora bench: {_describe(settings)}",
        hollow=("floor",),  # the limit, not a contender
    )

"""``runlora bench``: the training step of a whole model, runlora against PEFT and the frozen floor.

Arms, all built on one randomly initialised model whose weights they share (each arm is a deep
copy of the module tree that reuses the same parameter tensors, so no weight exists twice):

    floor            every weight frozen, ``enable_input_require_grads``: what any exact LoRA
                     must at least pay (the backward still flows through every layer)
    peft             ``peft.get_peft_model`` with the same LoraConfig fields
    runlora/<crit>   ``runlora.get_runlora_model``, one arm per planning criterion

With ``quant`` 4bit/8bit the shared base model's linear layers (all but the head) are
quantized with ``runlora.quant.quantize_model`` first, so every arm runs on the same packed W.

The step is forward + loss + backward on a fixed random batch (token ids with the LM loss, or
pixels and labels). Arms run interleaved, one step each per round (the order rotating from round
to round) after warm-up rounds, so drift and a noisy neighbour hit all arms alike.

Memory, measured on one extra untimed step per arm:

    saved_mib   bytes saved for backward (``torch.autograd.graph.saved_tensors_hooks``), each
                storage counted once by its data pointer, parameters and buffers excluded
    peak_mib    CUDA: ``max_memory_allocated`` over the step minus what was allocated before it;
                CPU (Linux): the rise of the process's resident set over the step, after
                ``malloc_trim`` and a reset of its high-water mark (``/proc/self/clear_refs``).
                Allocator caching makes the CPU figure coarser than the CUDA one.
"""

from __future__ import annotations

import copy
import csv
import ctypes
import gc
import importlib.util
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import configs

__all__ = [
    "BenchSettings",
    "BenchError",
    "Arm",
    "ArmResult",
    "ConfigResult",
    "interleave",
    "measure_arms",
    "saved_tensor_bytes",
    "summarize",
    "run_bench",
    "format_table",
    "write_outputs",
    "resolve_device",
    "environment",
    "DTYPES",
    "MIB",
]

MIB = 2**20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANT = ("none", "4bit", "8bit")
Clock = Callable[[], float]


class BenchError(ValueError):
    """A setting that cannot run (bad size, dtype for the device, target names): the message
    says what to change."""


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

    def check(self) -> None:
        """Raise ValueError, with what to do, on any setting that cannot run."""
        from ..planning.planner import CRITERIA

        for name in ("batch_size", "seq_len", "r", "warmup_rounds", "min_rounds", "max_rounds"):
            value = getattr(self, name)
            low = 0 if name == "warmup_rounds" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise BenchError(f"{name.replace('_', ' ')} must be an int >= {low}, got {value!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise BenchError(f"lora dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.min_run_time >= 0.0:
            raise BenchError(f"min run time must be >= 0 seconds, got {self.min_run_time}")
        if self.dtype not in DTYPES:
            raise BenchError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.device not in ("cpu", "cuda"):
            raise BenchError(
                f"device must be 'cpu' or 'cuda' (resolve 'auto' first), got {self.device!r}"
            )
        if self.device == "cuda" and not torch.cuda.is_available():
            raise BenchError("--device cuda, but torch sees no CUDA device; use --device cpu")
        if self.device == "cpu" and self.dtype == "fp16":
            raise BenchError(
                "fp16 training steps are not supported on CPU (many CPU kernels "
                "lack fp16); use --dtype bf16 or fp32, or --device cuda"
            )
        unknown = [c for c in self.criterions if c not in CRITERIA]
        if unknown or not self.criterions:
            raise BenchError(
                f"unknown criterion {unknown[0] if unknown else '(none)'!r}; "
                f"known: {', '.join(CRITERIA)}"
            )
        if self.quant not in QUANT:
            raise BenchError(f"--quant must be one of {', '.join(QUANT)}, got {self.quant!r}")
        if self.quant != "none":
            if importlib.util.find_spec("runlora.quant") is None:
                raise BenchError(
                    f"--quant {self.quant} needs runlora.quant, which this install "
                    "lacks; use --quant none"
                )
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


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# --- timing -------------------------------------------------------------------------------


def _no_sync() -> None:
    return None


def interleave(
    steps: dict[str, Callable[[], object]],
    *,
    warmup_rounds: int = 2,
    min_run_time: float = 15.0,
    min_rounds: int = 5,
    max_rounds: int = 10_000,
    clock: Clock = time.perf_counter,
    sync: Callable[[], None] = _no_sync,
    progress: bool = False,
    desc: str = "",
) -> dict[str, list[float]]:
    """Seconds per call of each step, the steps run round-robin.

    Each round runs every step once, starting one further along each round so no step always
    follows the same one. Warm-up rounds are run and dropped. Timed rounds go on until every
    step has run ``min_run_time`` seconds in total and at least ``min_rounds`` rounds, or
    ``max_rounds``. ``clock`` is read around each step after ``sync()`` (CUDA synchronize).
    """
    from tqdm.auto import tqdm

    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}

    def one_round(k: int, record: bool) -> None:
        for j in range(len(names)):
            name = names[(k + j) % len(names)]
            sync()
            t0 = clock()
            steps[name]()
            sync()
            elapsed = clock() - t0
            if record:
                times[name].append(elapsed)
            else:
                last[name] = elapsed

    last: dict[str, float] = {}
    bar = tqdm(
        total=warmup_rounds + min_rounds,
        desc=desc or "bench",
        unit="round",
        disable=not progress,
        leave=False,
        file=sys.stderr,
    )
    with bar:
        for k in range(warmup_rounds):
            one_round(k, record=False)
            bar.update()
        fastest = min(last.values()) if last else 0.0
        planned = min_rounds
        if fastest > 0:
            planned = max(min_rounds, math.ceil(min_run_time / fastest))
        bar.total = warmup_rounds + min(planned, max_rounds)
        bar.refresh()
        k = 0
        while k < max_rounds and (
            k < min_rounds or min(sum(t) for t in times.values()) < min_run_time
        ):
            one_round(warmup_rounds + k, record=True)
            k += 1
            bar.update()
    return times


# --- memory -------------------------------------------------------------------------------


def saved_tensor_bytes(
    fn: Callable[[], object],
    exclude: Iterable[int] = (),
    exclude_params_of: nn.Module | None = None,
) -> tuple[int, object]:
    """(bytes autograd saves for backward while ``fn()`` runs, ``fn()``'s result).

    Each storage is counted once, by its data pointer; storages whose pointer is in ``exclude``
    (parameters, buffers) are not counted, nor, with ``exclude_params_of``, the storages of that
    module's parameters and buffers as registered at the moment a tensor is saved: under FSDP2 a
    layer's all-gathered weights are its parameters only while it runs, and autograd saves views
    of them (``weight.t()``) that are not Parameter objects. The tensors are kept as they are.
    """
    skip = set(exclude)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. sparse)
            return t
        ptr = storage.data_ptr()
        if ptr and ptr not in skip:
            if exclude_params_of is None or ptr not in _live_ptrs(exclude_params_of):
                seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(seen.values()), result


def _storage_ptrs(tensors: Iterable[torch.Tensor]) -> frozenset[int]:
    return frozenset(t.untyped_storage().data_ptr() for t in tensors)


def _live_ptrs(module: nn.Module) -> frozenset[int]:
    """Storage pointers of ``module``'s parameters and buffers now (DTensors: their shards)."""
    tensors = (*module.parameters(), *module.buffers())
    return _storage_ptrs(t.to_local() if hasattr(t, "to_local") else t for t in tensors)


def _rss_tools() -> tuple[Callable[[], None], Callable[[], int], Callable[[], int]] | None:
    """(reset high-water mark, current RSS bytes, peak RSS bytes), or None off Linux."""
    status = Path("/proc/self/status")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None

    def read(key: str) -> int:
        for line in status.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise OSError(f"{key} not in {status}")

    def reset() -> None:
        gc.collect()
        libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")

    return reset, lambda: read("VmRSS"), lambda: read("VmHWM")


def _peak_bytes(fn: Callable[[], object], device: str) -> tuple[int | None, str | None]:
    """(peak memory ``fn()`` adds, what kind of figure it is); (None, None) if unmeasurable."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, "cuda_max_allocated"
    tools = _rss_tools()
    if tools is None:
        fn()
        return None, None
    reset, rss, hwm = tools
    reset()
    base = rss()
    fn()
    return max(0, hwm() - base), "rss_rise"


# --- arms and results ---------------------------------------------------------------------


@dataclass
class Arm:
    """One implementation under test: ``step()`` runs forward + backward once.

    ``kind`` is ``"floor"``, ``"peft"`` or ``"runlora"``; ``exclude`` holds the storage pointers
    (parameters, buffers) that saved-for-backward bytes do not count.
    """

    name: str
    kind: str
    step: Callable[[], object]
    exclude: frozenset[int] = frozenset()
    trainable_params: int = 0


@dataclass
class ArmResult:
    name: str
    kind: str
    times_ms: list[float]
    saved_bytes: int
    peak_bytes: int | None
    peak_kind: str | None
    trainable_params: int = 0
    loss: float | None = None

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.times_ms)

    @property
    def std_ms(self) -> float:
        return statistics.stdev(self.times_ms) if len(self.times_ms) > 1 else 0.0

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)


def measure_arms(
    arms: list[Arm],
    *,
    device: str = "cpu",
    warmup_rounds: int = 2,
    min_run_time: float = 15.0,
    min_rounds: int = 5,
    max_rounds: int = 10_000,
    clock: Clock = time.perf_counter,
    progress: bool = False,
    desc: str = "",
) -> list[ArmResult]:
    """Time the arms interleaved (``interleave``), then measure each one's memory on one more,
    untimed step (hooks and counters cost time, so they stay out of the timed steps)."""
    sync = torch.cuda.synchronize if device == "cuda" else _no_sync
    times = interleave(
        {arm.name: arm.step for arm in arms},
        warmup_rounds=warmup_rounds,
        min_run_time=min_run_time,
        min_rounds=min_rounds,
        max_rounds=max_rounds,
        clock=clock,
        sync=sync,
        progress=progress,
        desc=desc,
    )
    results = []
    for arm in arms:
        box: dict[str, object] = {}

        def counted(arm: Arm = arm, box: dict = box) -> None:
            box["saved"], box["out"] = saved_tensor_bytes(arm.step, arm.exclude)

        peak, peak_kind = _peak_bytes(counted, device)
        out = box["out"]
        loss = float(out.detach().float()) if isinstance(out, torch.Tensor) else None
        results.append(
            ArmResult(
                arm.name,
                arm.kind,
                [t * 1e3 for t in times[arm.name]],
                int(box["saved"]),
                peak,
                peak_kind,
                arm.trainable_params,
                loss,
            )
        )
    return results


def summarize(arms: list[ArmResult]) -> list[dict]:
    """One row per arm with the derived columns.

    ``x_floor`` = mean step / the floor arm's; ``speedup_vs_peft_pct`` = (PEFT − arm) / PEFT ·
    100 on mean step time (the RunLoRA paper's "Speedup, %"); ``*_vs_peft_mib`` = PEFT's figure
    minus the arm's (positive: the arm needs less). None where the reference arm is missing.
    """
    by_kind = {a.kind: a for a in arms}
    floor, peft = by_kind.get("floor"), by_kind.get("peft")

    def diff_mib(ref: int | None, value: int | None) -> float | None:
        return None if ref is None or value is None else (ref - value) / MIB

    rows = []
    for a in arms:
        rows.append(
            {
                "arm": a.name,
                "kind": a.kind,
                "steps": len(a.times_ms),
                "ms_mean": a.mean_ms,
                "ms_std": a.std_ms,
                "ms_median": a.median_ms,
                "x_floor": a.mean_ms / floor.mean_ms if floor else None,
                "speedup_vs_peft_pct": (
                    (peft.mean_ms - a.mean_ms) / peft.mean_ms * 100
                    if peft and a is not peft
                    else None
                ),
                "saved_mib": a.saved_bytes / MIB,
                "saved_vs_peft_mib": (
                    diff_mib(peft.saved_bytes, a.saved_bytes) if peft and a is not peft else None
                ),
                "peak_mib": None if a.peak_bytes is None else a.peak_bytes / MIB,
                "peak_vs_peft_mib": (
                    diff_mib(peft.peak_bytes, a.peak_bytes) if peft and a is not peft else None
                ),
                "peak_kind": a.peak_kind,
                "trainable_params": a.trainable_params,
                "loss": a.loss,
            }
        )
    return rows


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
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
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
    """The floor, PEFT and one runlora arm per criterion, sharing ``model``'s weights."""
    import peft

    from ..config import LoraConfig
    from ..integrations.peft import describe, get_runlora_model

    model.requires_grad_(False)
    exclude = _storage_ptrs((*model.parameters(), *model.buffers()))

    def arm(name: str, kind: str, wrapped: nn.Module) -> Arm:
        trainable = [p for p in wrapped.parameters() if p.requires_grad]
        every = _storage_ptrs((*wrapped.parameters(), *wrapped.buffers()))
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
    for criterion in settings.criterions:
        config = LoraConfig(
            r=settings.r,
            lora_alpha=settings.lora_alpha,
            lora_dropout=settings.lora_dropout,
            target_modules=list(targets),
            criterion=criterion,
        )
        wrapped = get_runlora_model(
            _weight_sharing_copy(model), config, autocast_adapter_dtype=False
        )
        # A layer left on PEFT's forward would time PEFT under runlora's name.
        slow = [row for row in describe(wrapped, file=None) if row.engine != "runlora"]
        if slow:
            raise BenchError(
                f"runlora/{criterion}: {len(slow)} LoRA layers would run PEFT's forward, not "
                f"runlora's op ({slow[0].name}: {slow[0].detail}); leave them out of "
                "--target-modules"
            )
        arms.append(arm(f"runlora/{criterion}", "runlora", wrapped))
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
        device=settings.device,
        warmup_rounds=settings.warmup_rounds,
        min_run_time=settings.min_run_time,
        min_rounds=settings.min_rounds,
        max_rounds=settings.max_rounds,
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


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


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
                _fmt(r["ms_mean"], ".1f"),
                _fmt(r["ms_std"], ".1f"),
                _fmt(r["x_floor"], ".3f"),
                _fmt(r["speedup_vs_peft_pct"], "+.1f", " %"),
                _fmt(r["saved_mib"], ".1f"),
                _fmt(r["saved_vs_peft_mib"], "+.1f"),
                _fmt(r["peak_mib"], ".1f"),
                _fmt(r["peak_vs_peft_mib"], "+.1f"),
            ]
            for r in rows
        ]
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
        for row in [head, *body]:
            cells = [row[0].ljust(widths[0])]
            cells += [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)]
            lines.append("  " + "  ".join(cells))
        if peak_kind:
            lines.append(f"  peak: {PEAK_KINDS[peak_kind]}")
        counts = {r["arm"]: r["trainable_params"] for r in rows if r["kind"] != "floor"}
        if len(set(counts.values())) > 1:
            lines.append(
                "  WARNING: the arms train different parameter counts ("
                + ", ".join(f"{k} {v}" for k, v in counts.items())
                + "): they do not adapt the same layers"
            )
    lines.append("")
    lines.append(
        "speedup vs PEFT = (PEFT - arm) / PEFT on mean step time; "
        "'vs PEFT' memory columns are PEFT minus arm (positive: arm uses less); "
        "saved = bytes saved for backward, parameters excluded."
    )
    return "\n".join(lines)


PEAK_KINDS = {
    "cuda_max_allocated": "torch.cuda.max_memory_allocated over one step, above the memory "
    "allocated before it",
    "rss_rise": "rise of the process's resident set over one step (after malloc_trim, "
    "high-water mark reset)",
}


def environment(device: str) -> dict:
    """Versions, thread count and device, for the JSON reports."""
    import transformers

    import runlora

    env = {
        "runlora": runlora.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
        "device": device,
    }
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        pass
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write_csv_json(prefix: Path, rows: list[dict], doc: dict) -> tuple[Path, Path]:
    """PREFIX.csv with ``rows`` (one header from the first row) and PREFIX.json with ``doc``."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    csv_path = prefix.with_name(prefix.name + ".csv")
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    json_path = prefix.with_name(prefix.name + ".json")
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    return csv_path, json_path


def write_outputs(
    results: list[ConfigResult], settings: BenchSettings, prefix: str | Path
) -> list[Path]:
    """PREFIX.csv (one row per model and arm), PREFIX.json (settings, environment, every step
    time) and PREFIX.png (speedup and memory saved vs PEFT per model). Returns the paths."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
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
    csv_path, json_path = write_csv_json(prefix, rows, doc)
    png_path = prefix.with_name(prefix.name + ".png")
    write_plot(results, settings, png_path)
    return [csv_path, json_path, png_path]


def write_plot(results: list[ConfigResult], settings: BenchSettings, path: Path) -> None:
    """Two panels, one group of bars per model and one bar per arm: step-time speedup over
    PEFT (%) and bytes saved for backward, in MiB less than PEFT's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arm_names = [a.name for a in results[0].arms if a.kind != "peft"]
    models = [res.model for res in results]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(max(8, 2.5 * len(models) + 4), 4.2))
    width = 0.8 / max(1, len(arm_names))
    for i, name in enumerate(arm_names):
        xs = [m + (i - (len(arm_names) - 1) / 2) * width for m in range(len(models))]
        speed, saved = [], []
        for res in results:
            row = next((r for r in res.rows() if r["arm"] == name), {})
            speed.append(row.get("speedup_vs_peft_pct") or 0.0)
            saved.append(row.get("saved_vs_peft_mib") or 0.0)
        # The floor is the limit, not a contender: drawn hollow.
        style = {"color": "white", "edgecolor": "gray", "hatch": "//"} if name == "floor" else {}
        ax_t.bar(xs, speed, width, label=name, **style)
        ax_m.bar(xs, saved, width, label=name, **style)
    for ax, title in (
        (ax_t, "step time: speedup over PEFT (%)"),
        (ax_m, "saved for backward: MiB less than PEFT"),
    ):
        ax.set_xticks(range(len(models)), models)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(f"runlora bench: {_describe(settings)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""runlora under ``torch.distributed`` (DDP, FSDP2, accelerate): one plan for all, one adapter.

The op itself needs nothing for distributed training: under DDP each rank runs it on its own
batch, and under FSDP2 (``fully_shard``) the frozen base weight is all-gathered into a plain
unsharded tensor before each forward and backward, which the op uses as it is (no copy). What
does need care is around the op:

- **Plans.** A rank that plans by ``"time"`` measures candidates for seconds while the others
  wait in a collective, and two ranks that measure may choose different orders. ``sync_plans``
  plans every target layer once on one rank (``src``) and hands the plans (and the roofline
  calibration) to the others, who run them as their own; it then checks that every rank holds
  the same plans. ``"flops"`` plans are deterministic: they are only checked.
- **Saving.** Under FSDP2 the adapter tensors are shards (``DTensor``), and PEFT's own
  ``model.save_pretrained`` writes them as they are. ``save_adapter`` gathers only the adapter
  tensors (never the frozen base) and writes one PEFT-format adapter from rank 0.

The model is PEFT's own ``PeftModel`` (``runlora.get_runlora_model``, ``runlora.from_peft``,
``runlora.patch_peft``); the layers planned are its LoRA layers that run runlora's op (and any
``RunLoRALinear``).

Typical use, once the model is wrapped and sharded and before the first step::

    sync_plans(model, n_tokens=batch_size * seq_len, dtype=torch.bfloat16)
    ...
    save_adapter(model, "out/adapter")      # every rank calls it; rank 0 writes
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..planning.cache import default_cache, device_key
from ..planning.planner import Plan, install_plans, plan_bucketed
from ..planning.request import PlanRequest

__all__ = [
    "PlanRequest",
    "plan_requests",
    "preplan",
    "sync_plans",
    "gather_adapter_state_dict",
    "save_adapter",
    "shutdown",
]


def _lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, layer)`` for each layer that runs the op and plans by itself (a
    ``RunLoRALinear``, or a PEFT layer runlora accelerates) and has an adapter to run."""
    from ..layers.layer import LoRAEngine

    for name, module in model.named_modules():
        if isinstance(module, LoRAEngine) and module.plan is None and module.live_adapters():
            yield name, module


def _layer_request(
    layer: nn.Module, n_tokens: int, needs_input_grad: bool, dtype: torch.dtype, device
) -> PlanRequest:
    from ..layers.layer import full_shape

    adapters = layer.op_adapters(layer.live_adapters())
    _, bias, quant = layer.base_weight_args()
    # (r, in) and (out, r); under FSDP2 DTensors of the full shape, under ZeRO-3 partitions.
    # Several adapters in one op call stack their ranks (and run without dropout).
    r = sum(full_shape(layer.lora_A[a].weight)[0] for a in adapters)
    in_features = full_shape(layer.lora_A[adapters[0]].weight)[1]
    out_features = full_shape(layer.lora_B[adapters[0]].weight)[0]
    dropout = layer.planned_dropout(adapters[0]) if layer.training else 0.0
    return PlanRequest.for_call(
        n_tokens,
        in_features,
        out_features,
        r,
        criterion=layer.criterion,
        needs_input_grad=needs_input_grad,
        bias=bias is not None,
        dropout=dropout if len(adapters) == 1 else 0.0,
        dtype=dtype,
        device=device,
        quantized=quant is not None,
    ).bucketed()


def _sorted(requests: Iterable[PlanRequest]) -> list[PlanRequest]:
    """Each request once, in an order every rank agrees on (a rank's requests are all for its
    own device, which therefore orders nothing)."""
    return sorted(set(requests), key=lambda q: tuple(q.to_dict().values()))


def plan_requests(
    model: nn.Module,
    n_tokens: int,
    *,
    input_grad: Iterable[bool] = (True, False),
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> list[PlanRequest]:
    """The distinct requests the LoRA layers of ``model`` make for ``n_tokens`` tokens per call.

    Args:
        model: any module holding LoRA layers that run runlora's op (a ``PeftModel`` from
            ``get_runlora_model``, ``RunLoRALinear``s), wrapped by DDP/FSDP2/DeepSpeed or not.
            Layers on PEFT's forward and layers with a fixed ``plan`` ask for nothing.
        n_tokens: batch size × sequence length of one forward (per rank).
        input_grad: which values of "x requires grad" to plan for. Both by default: the first
            adapted layer of a model with frozen embeddings sees an input without grad, the
            others one with grad (and gradient checkpointing changes which is which).
        dtype: the dtype the layers compute in (bf16 under an FSDP2 ``MixedPrecisionPolicy``
            or autocast); default the LoRA weights' dtype.
        device: default the LoRA weights' device.

    Returns:
        The requests (``runlora.planning.PlanRequest``, N bucketed), sorted, each once (layers
        of one shape share a request).
    """
    if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive int (batch × sequence), got {n_tokens!r}")
    flags = tuple(dict.fromkeys(bool(f) for f in input_grad))
    weight = _first_lora_weight(model)
    if dtype is None:
        dtype = weight.dtype if weight is not None else torch.float32
    if device is None:
        device = weight.device if weight is not None else "cpu"
    return _sorted(
        _layer_request(layer, n_tokens, flag, dtype, device)
        for _, layer in _lora_layers(model)
        for flag in flags
    )


def _first_lora_weight(model: nn.Module) -> Tensor | None:
    for _, layer in _lora_layers(model):
        return layer.lora_A[layer.live_adapters()[0]].weight
    return None


def _resolve(model_or_requests, n_tokens, input_grad, dtype, device) -> list[PlanRequest]:
    if isinstance(model_or_requests, nn.Module):
        if n_tokens is None:
            raise ValueError("n_tokens is required with a model: pass batch_size * seq_len")
        return plan_requests(
            model_or_requests, n_tokens, input_grad=input_grad, dtype=dtype, device=device
        )
    local = {k: v for k, v in (("dtype", dtype), ("device", device)) if v is not None}
    return _sorted(replace(req, **local) for req in model_or_requests)


def preplan(
    model_or_requests: nn.Module | Iterable[PlanRequest],
    n_tokens: int | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    input_grad: Iterable[bool] = (True, False),
) -> dict[PlanRequest, Plan]:
    """Plan every LoRA layer of a model (or every request) now, in this process only.

    A training loop then finds each plan memoised at its first step instead of measuring in it.

    Args:
        model_or_requests: a model with runlora layers, or ``PlanRequest``\\ s.
        n_tokens: batch size × sequence length per forward (with a model).
        dtype: the dtype the layers compute in (bf16 under an FSDP2 ``MixedPrecisionPolicy``
            or autocast); default the LoRA weights' dtype, or each request's own.
        device: default the LoRA weights' device, or each request's own.

    Returns:
        ``{request: plan}``.
    """
    requests = _resolve(model_or_requests, n_tokens, input_grad, dtype, device)
    return {req: plan_bucketed(req) for req in requests}


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sync_plans(
    model_or_requests: nn.Module | Iterable[PlanRequest],
    n_tokens: int | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    input_grad: Iterable[bool] = (True, False),
    src: int = 0,
    group: dist.ProcessGroup | None = None,
) -> dict[PlanRequest, Plan]:
    """Make every rank run the same plans, planned once; call it on every rank, before training.

    With a measuring criterion (``"time"``, ``"roofline"``) rank ``src`` calibrates the device
    and plans each request; the plans and the calibration are broadcast, and the other ranks
    install them as their own (``planner.install_plans``), so no other rank measures anything,
    now or for a shape planned later by ``"roofline"``. With ``"flops"`` each rank plans (it is
    deterministic and free). Then every rank's plans are compared with ``src``'s (requests are
    compared but for their device: each rank plans for its own).

    Without an initialised process group this is ``preplan``. Arguments as in ``preplan``;
    ``src`` is a global rank, ``group`` the process group (default: the world).

    Returns:
        ``{request: plan}``, the same on every rank.

    Raises:
        RuntimeError: if the ranks' models ask for different requests, or a rank ends up with a
            plan other than ``src``'s (the error names the rank and the request).
        ValueError: if the measured requests of one rank are for several dtypes or devices.
    """
    requests = _resolve(model_or_requests, n_tokens, input_grad, dtype, device)
    rank, world = _world()
    if world == 1:
        return {req: plan_bucketed(req) for req in requests}
    measured = [req for req in requests if req.criterion != "flops"]
    if measured:
        targets = {(req.dtype, req.device) for req in measured}
        if len(targets) != 1:
            raise ValueError(
                f"runlora.sync_plans plans for one dtype and device per rank, got requests for "
                f"{sorted((str(t), d) for t, d in targets)}; pass dtype= and device="
            )
        ((dtype, device),) = targets
        payload: list = [None]
        if rank == src:
            from ..planning.roofline import calibrate

            calibration = calibrate(dtype, device)
            plans = [plan_bucketed(req).to_dict() for req in requests]
            payload = [([req.to_dict() for req in requests], plans, calibration)]
        dist.broadcast_object_list(payload, src=src, group=group)
        src_requests, plans, calibration = payload[0]
        if rank != src:
            _check_same_requests(requests, src_requests, rank, src)
            default_cache().put("devices", device_key(device, dtype), calibration)
            install_plans(zip(src_requests, plans, strict=True), device=device)
    result = {req: plan_bucketed(req) for req in requests}
    _check_same_plans(result, rank, world, src, group)
    return result


def _across_ranks(request: dict) -> tuple:
    """What must agree between ranks of a ``PlanRequest.to_dict()``: all but the device (each
    rank plans for its own)."""
    return tuple((k, v) for k, v in request.items() if k != "device")


def _check_same_requests(mine: list[PlanRequest], theirs: list[dict], rank: int, src: int):
    mine_set = {_across_ranks(req.to_dict()) for req in mine}
    theirs_set = {_across_ranks(d) for d in theirs}
    if mine_set != theirs_set:
        extra = [dict(q) for q in sorted(mine_set - theirs_set)[:3]]
        missing = [dict(q) for q in sorted(theirs_set - mine_set)[:3]]
        raise RuntimeError(
            f"runlora.sync_plans: rank {rank}'s model asks for other layer shapes than rank "
            f"{src}'s (only here: {extra}, only on rank {src}: {missing}); every rank must wrap "
            "the same model with the same LoraConfig and pass the same n_tokens"
        )


def _check_same_plans(result: dict[PlanRequest, Plan], rank, world, src, group) -> None:
    mine = [(dict(_across_ranks(req.to_dict())), _signature(plan)) for req, plan in result.items()]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine, group=group)
    src_index = src if group is None else dist.get_group_rank(group, src)
    reference = gathered[src_index]
    for index, theirs in enumerate(gathered):
        if theirs != reference:
            diff = next((d for d in zip(theirs, reference, strict=False) if d[0] != d[1]), None)
            if diff is None:  # one list is a prefix of the other
                raise RuntimeError(
                    f"runlora.sync_plans: rank {index} plans {len(theirs)} layer shapes, rank "
                    f"{src} {len(reference)}; every rank must wrap the same model with the same "
                    "LoraConfig and pass the same n_tokens"
                )
            raise RuntimeError(
                f"runlora.sync_plans: rank {index} plans {diff[0][0]} as {diff[0][1]}, rank {src} "
                f"as {diff[1][1]}; all ranks must run one plan per layer shape"
            )


def _signature(plan: Plan) -> tuple[str, str, str, str]:
    return plan.forward, plan.backward, plan.layout, plan.criterion


# --- saving --------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP, a DeepSpeed engine (or accelerate's / torch.compile's wrappers);
    FSDP2 wraps in place."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel) or (
            any(cls.__name__ == "DeepSpeedEngine" for cls in type(model).__mro__)
            and isinstance(model.module, nn.Module)
        ):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _full_tensor(t: Tensor) -> Tensor:
    """``t`` whole, on CPU. A collective for a sharded tensor: every rank must ask for the same
    tensors in the same order."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):  # FSDP2
        return t.full_tensor().detach().cpu()
    if hasattr(t, "ds_id"):  # a DeepSpeed ZeRO-3 partitioned parameter
        import deepspeed

        with deepspeed.zero.GatheredParameters([t]):
            return t.detach().cpu().clone()
    return t.detach().cpu()


def gather_adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """Adapter ``adapter_name``'s tensors under PEFT's file keys, full and on CPU, on every
    rank.

    PEFT picks the tensors (``get_peft_model_state_dict``) from the model's own parameters and
    buffers: DTensor shards under FSDP2, partitioned parameters under ZeRO-3. Under FSDP2 each
    is all-gathered (``DTensor.full_tensor``), under ZeRO-3 each partitioned one is gathered;
    the frozen base never is. A collective: call it on every rank (tensors go in key order, the
    same on every rank).

    Keys are PEFT's file keys also for blocks wrapped by ``checkpoint_wrapper`` (accelerate's
    FSDP activation checkpointing): PEFT finds its layers by module name, which holds the
    wrapper's ``_checkpoint_wrapped_module.`` while ``state_dict()`` keys drop it (so PEFT's
    own ``get_peft_model_state_dict(model)`` finds nothing there); the tensors are named by
    module path for PEFT, and the wrapper's segment is dropped from the keys PEFT returns.
    """
    from peft.utils import get_peft_model_state_dict
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX

    inner = _unwrap(model)
    named = dict(inner.named_parameters(remove_duplicate=False))
    named.update(inner.named_buffers(remove_duplicate=False))
    picked = get_peft_model_state_dict(inner, state_dict=named, adapter_name=adapter_name)
    picked = {k.replace(_CHECKPOINT_PREFIX, ""): t for k, t in picked.items()}
    return {k: _full_tensor(picked[k]) for k in sorted(picked)}


def save_adapter(
    model: nn.Module, save_directory: str | os.PathLike, *, adapter_name: str = "default"
) -> Path | None:
    """Write one PEFT-format adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
    from a distributed run: every rank calls it, the adapter tensors are gathered, rank 0 writes
    (atomically: a crash leaves the previous adapter as it was).

    ``model``: a ``peft.PeftModel`` as it is, inside DDP or a DeepSpeed engine, or sharded by
    FSDP2; without a process group it saves in this process. ``adapter_name``: which of the
    model's adapters; it is written to ``save_directory`` itself.

    Returns:
        The directory on rank 0, None on the other ranks.
    """
    from .peft import save_adapter_files

    inner = _unwrap(model)
    if adapter_name not in getattr(inner, "peft_config", {}):
        raise TypeError(
            f"save_adapter needs a peft.PeftModel with an adapter {adapter_name!r} (from "
            f"runlora.get_runlora_model or peft.get_peft_model), got {type(inner).__name__}"
        )
    rank, world = _world()
    tensors = gather_adapter_state_dict(inner, adapter_name)
    if rank == 0:
        save_adapter_files(inner, save_directory, tensors, adapter_name)
    if world > 1:
        dist.barrier()
    return Path(save_directory) if rank == 0 else None


# --- the end of a run ---------------------------------------------------------------------


def shutdown() -> None:
    """End a run's default process group cleanly: wait for every rank (so no peer still has a
    collective in flight), drop the finished work objects, then destroy the group. Call it on
    every rank, after the last collective, on the success path only (a rank that failed
    should just raise: its peers would wait for it in the barrier).

    Destroying a gloo group while a peer is still communicating, or leaving work objects to
    interpreter exit, aborts a rank now and then ("terminate called without an active
    exception", SIGABRT); this project's CPU tests and benchmarks saw it in a few runs.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()

"""The ``"roofline"`` criterion: predict each pair's time from its products, no timing per shape.

Once per device and dtype (cached on disk) runlora measures:

- ``peak_flops``: a large GEMM's throughput;
- ``bandwidth``: bytes per second of a large copy;
- ``overhead_s``: the fixed cost of one small product (dispatch, kernel launch);
- ``efficiency[form]``: for each skinny rank-r product form (and layout), the ratio of its
  roofline time to its measured time at reference sizes. This is where layout lives: on MKL the
  autograd form of dB = dYᵀ (X Aᵀ) runs at a sixth of the speed of the tuned form.

A product then takes ``overhead + max(flops / peak, bytes / bandwidth) / efficiency``.
"""

from __future__ import annotations

import math

import torch

from ..ops.products import db_from_la, la_product, z_product
from ..ops.variants import LAYOUTS, Problem, Product
from .cache import default_cache, device_key
from .clock import time_call
from .scoring import pair_cost, scored_plan

__all__ = ["calibrate", "predict_ms", "predict_halves", "by_roofline"]

_MEASURED: dict[str, dict] = {}
_LAYOUT_FORMS = {"Z = dY B", "dB = dYᵀ (L Aᵀ)"}
_REF_RANKS = (8, 64)


def _form(label: str, layout: str) -> str:
    return f"{label}|{layout}" if label in _LAYOUT_FORMS else label


def _ref_sizes(device: torch.device) -> tuple[int, int]:
    return (4096, 1024) if device.type == "cpu" else (16384, 4096)


def _roof_s(p: Product, peak: float, bw: float, itemsize: int) -> float:
    return max(p.flops / peak, p.elements * itemsize / bw)


def _skinny_forms(n: int, d: int, r: int, dtype, device) -> dict:
    """form -> (Product, fn) for the rank-r products at reference sizes (N = n, in = out = d)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)

    x, dy, a, b = rnd(n, d), rnd(n, d), rnd(r, d), rnd(d, r)
    z, la, gm, w = rnd(n, r), rnd(n, r), rnd(d, d), rnd(d, d)
    forms = {
        "L Aᵀ": (Product("L Aᵀ", n, r, d), lambda: la_product(x, a)),
        "dA = Zᵀ L": (Product("", r, d, n), lambda: z.t() @ x),
        "dA = Bᵀ G": (Product("", r, d, d), lambda: b.t() @ gm),
        "dB = G Aᵀ": (Product("", d, r, d), lambda: gm @ a.t()),
        "dX += s·Z A": (Product("", n, d, r), lambda: torch.addmm(dy, z, a, out=dy)),
        "(L Aᵀ) Bᵀ": (Product("", n, d, r), lambda: torch.addmm(dy, la, b.t(), out=dy)),
        "W + s·B A": (Product("", d, d, r), lambda: torch.addmm(w, b, a)),
    }
    for layout in LAYOUTS:
        forms[_form("Z = dY B", layout)] = (
            Product("", n, r, d),
            lambda layout=layout: z_product(dy, b, layout),
        )
        forms[_form("dB = dYᵀ (L Aᵀ)", layout)] = (
            Product("", d, r, n),
            lambda layout=layout: db_from_la(dy, la, layout),
        )
    return forms


def calibrate(
    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", *, refresh: bool = False
) -> dict:
    """Measure (or load from the plan cache) this device's roofline parameters for ``dtype``."""
    device = torch.device(device)
    with torch.no_grad(), torch.autocast(device.type, enabled=False):  # measured in ``dtype``
        return _calibrate(dtype, device, refresh)


def _calibrate(dtype: torch.dtype, device: torch.device, refresh: bool) -> dict:
    key = device_key(device, dtype)
    cache = default_cache()
    if not refresh:
        hit = cache.get("devices", key)
        if hit and {"peak_flops", "bandwidth", "overhead_s", "efficiency"} <= hit.keys():
            return hit
        if key in _MEASURED:  # measured by this process, for another cache file
            cache.put("devices", key, _MEASURED[key])
            return _MEASURED[key]
    size = dtype.itemsize
    n_big = 1024 if device.type == "cpu" else 8192
    m1 = torch.randn(n_big, n_big).to(device=device, dtype=dtype)
    m2 = torch.randn(n_big, n_big).to(device=device, dtype=dtype)
    gemm_ms = time_call(lambda: m1 @ m2, device, 0.3, max_reps=5)
    peak = 2 * n_big**3 / (gemm_ms / 1e3)
    src = torch.empty(32 * 2**20 // size, device=device, dtype=dtype).normal_()
    dst = torch.empty_like(src)
    copy_ms = time_call(lambda: dst.copy_(src), device, 0.2, max_reps=10)
    bw = 2 * src.numel() * size / (copy_ms / 1e3)
    t8 = torch.randn(8, 8).to(device=device, dtype=dtype)
    overhead = time_call(lambda: t8 @ t8, device, 0.05, max_reps=50) / 1e3
    n, d = _ref_sizes(device)
    eff: dict[str, list[float]] = {}
    for r in _REF_RANKS:
        for form, (prod, fn) in _skinny_forms(n, d, r, dtype, device).items():
            measured = time_call(fn, device, 0.05, max_reps=5) / 1e3
            roof = _roof_s(prod, peak, bw, size)
            eff.setdefault(form, []).append(min(4.0, roof / max(measured - overhead, 1e-9)))
    result = {
        "peak_flops": peak,
        "bandwidth": bw,
        "overhead_s": overhead,
        "efficiency": {k: v for k, v in eff.items()},
        "ref_ranks": list(_REF_RANKS),
    }
    _MEASURED[key] = result
    cache.put("devices", key, result)
    return result


def _efficiency(calib: dict, form: str, r: int) -> float:
    values = calib["efficiency"].get(form)
    if not values:
        return 1.0
    lo, hi = calib.get("ref_ranks", _REF_RANKS)
    if len(values) == 1 or r <= lo:
        return values[0]
    if r >= hi:
        return values[-1]
    t = (math.log(r) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return math.exp((1 - t) * math.log(values[0]) + t * math.log(values[-1]))


def predict_ms(products, calib: dict, itemsize: int, r: int, layout: str = "tuned") -> float:
    """Predicted milliseconds of a sequence of products on the calibrated device."""
    peak, bw, over = calib["peak_flops"], calib["bandwidth"], calib["overhead_s"]
    total = 0.0
    for p in products:
        t = _roof_s(p, peak, bw, itemsize)
        if p.k:
            t = over + t / _efficiency(calib, _form(p.label, layout), r)
        total += t
    return total * 1e3


def predict_halves(problem: Problem, pairs, dtype, device):
    """Predicted ms of each forward variant and each (backward variant, layout)."""
    calib = calibrate(dtype or torch.float32, device)
    size = (dtype or torch.float32).itemsize
    fwd_ms, bwd_ms = {}, {}
    for fwd, bwd in pairs:
        if fwd.name not in fwd_ms:
            fwd_ms[fwd.name] = predict_ms(fwd.cost(problem).products, calib, size, problem.r)
        for layout in LAYOUTS:
            if (bwd.name, layout) not in bwd_ms:
                bwd_ms[(bwd.name, layout)] = predict_ms(
                    bwd.cost(problem).products, calib, size, problem.r, layout
                )
    return fwd_ms, bwd_ms


def by_roofline(problem, pairs, dtype, device):
    dtype = dtype or torch.float32
    fwd_ms, bwd_ms = predict_halves(problem, pairs, dtype, torch.device(device))
    scored = []
    for fwd, bwd in pairs:
        cost = pair_cost(fwd, bwd, problem)
        for layout in LAYOUTS:
            ms = fwd_ms[fwd.name] + bwd_ms[(bwd.name, layout)]
            plan = scored_plan(
                fwd,
                bwd,
                layout,
                problem,
                dtype,
                "roofline",
                predicted_ms=round(ms, 4),
                reason=f"lowest roofline prediction: {ms:.3f} ms",
            )
            # Round so that twins with equal predictions fall back to the lower peak.
            scored.append(((round(ms, 6), cost.peak_elements, cost.flops), plan))
    return scored

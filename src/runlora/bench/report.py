"""What the benches write: CSV and JSON files, fixed-width text tables, bar charts.

Nothing here knows a bench's rows; the model and layer benches say what goes in.
"""

from __future__ import annotations

import csv
import importlib
import json
import sys
from collections.abc import Collection
from pathlib import Path

import torch

__all__ = ["environment", "write_csv_json", "fmt", "text_table", "bar_panels"]


def environment(device: str) -> dict:
    """Versions, thread count and device, for the JSON reports (transformers and PEFT only
    where installed)."""
    import runlora

    env = {
        "runlora": runlora.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
        "device": device,
    }
    for name in ("transformers", "peft"):
        try:
            env[name] = importlib.import_module(name).__version__
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


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    """``value`` formatted by ``spec``, or ``-`` for None."""
    return "-" if value is None else f"{value:{spec}}{suffix}"


def text_table(head: list[str], body: list[list[str]], left: Collection[int] = (0,)) -> list[str]:
    """Lines of fixed-width columns, two spaces apart: the columns in ``left`` left-aligned,
    the others right-aligned; trailing blanks stripped."""
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = []
    for row in [head, *body]:
        cells = [
            cell.ljust(w) if i in left else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def bar_panels(
    path: Path,
    groups: list[str],
    panels: list[tuple[str, dict[str, list[float]]]],
    title: str,
    hollow: Collection[str] = (),
) -> None:
    """A PNG of side-by-side panels of grouped bars.

    Each panel is ``(title, {series: one value per group})``; every panel has one group of bars
    per entry of ``groups`` and one bar per series. Series named in ``hollow`` (a reference,
    not a contender) are drawn hatched and unfilled. Needs matplotlib.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(panels), figsize=(max(8, 2.5 * len(groups) + 4), 4.2), squeeze=False
    )
    for ax, (panel_title, series) in zip(axes[0], panels, strict=True):
        width = 0.8 / max(1, len(series))
        for i, (name, values) in enumerate(series.items()):
            xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
            style = {"color": "white", "edgecolor": "gray", "hatch": "//"} if name in hollow else {}
            ax.bar(xs, values, width, label=name, **style)
        ax.set_xticks(range(len(groups)), groups)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(panel_title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

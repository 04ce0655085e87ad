"""Markdown tables from the JSON files that benchmarks/run_all.sh writes (for RESULTS.md).

.venv/bin/python benchmarks/summarize.py benchmarks/results > /tmp/tables.md
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def model_tables(results: Path) -> list[str]:
    out = []
    for path in sorted(results.glob("model_*.json")):
        data = json.loads(path.read_text())
        s = data["settings"]
        out.append(
            f"\n**{path.stem}**: batch {s['batch_size']} × {s['seq_len']}, r = {s['r']}, "
            f"alpha {s['lora_alpha']:g}, dropout {s['lora_dropout']}, {s['dtype']}, "
            f"quant {s['quant']}\n"
        )
        out.append(
            "| model | arm | ms/step ± std | × floor | speedup vs PEFT | saved MiB | "
            "saved vs PEFT MiB | peak RSS rise MiB |"
        )
        out.append("|---|---|---|---|---|---|---|---|")
        for res in data["results"]:
            for row in res["rows"]:
                speed = "-" if row["kind"] == "peft" else f"{row['speedup_vs_peft_pct']:+.1f} %"
                saved_vs = "-" if row["kind"] == "peft" else f"{row['saved_vs_peft_mib']:+.1f}"
                out.append(
                    f"| {res['model']} | {row['arm']} | {row['ms_mean']:.0f} ± "
                    f"{row['ms_std']:.0f} | {row['x_floor']:.3f} | {speed} | "
                    f"{row['saved_mib']:.1f} | {saved_vs} | {row['peak_mib']:.0f} |"
                )
    return out


def layer_table(results: Path) -> list[str]:
    path = results / "layer.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    rows = data["rows"]
    out = [
        "\n| in × out | r | frozen ms | PEFT × frozen | runlora × frozen | runlora × PEFT | "
        "saved MiB PEFT / runlora | plan |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, dict] = {}
    for row in rows:
        groups.setdefault((row["in"], row["out"], row["r"]), {})[row["kind"]] = row
    ratios_f, ratios_p = [], []
    for (i, o, r), arms in groups.items():
        fr, pe, rl = arms["frozen"], arms["peft"], arms["runlora"]
        ratios_f.append(rl["x_frozen"])
        ratios_p.append(rl["x_peft"])
        out.append(
            f"| {i} × {o} | {r} | {fr['ms_mean']:.1f} | {pe['x_frozen']:.3f} | "
            f"{rl['x_frozen']:.3f} | {rl['x_peft']:.3f} | {pe['saved_mib']:.1f} / "
            f"{rl['saved_mib']:.1f} | {rl['forward']} / {rl['backward']} / {rl['layout']} |"
        )
    out.append(
        f"\nMedian runlora × frozen {statistics.median(ratios_f):.3f}, "
        f"runlora × PEFT {statistics.median(ratios_p):.3f}."
    )
    return out


def main() -> None:
    results = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
    print("\n".join(layer_table(results) + model_tables(results)))


if __name__ == "__main__":
    main()

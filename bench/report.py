"""Collect the runners' JSON lines into `bench/results/<date>-<gpu>.json` and print the markdown table.

python bench/report.py bench/results/raw/2026-11-29-h200-*.jsonl --out bench/results/2026-11-29-h200.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KEEP = ("system", "variant", "model", "max_length", "tokens_per_s", "peak_mem_gib", "mfu", "settings")


def load_runs(paths: list[str]) -> list[dict]:
    runs = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                run = json.loads(line)
                runs.append({**{key: run[key] for key in KEEP}, "source": Path(path).name, "env": run["env"]})
    return runs


def table(runs: list[dict], reference: float) -> str:
    rows = [
        "| system | variant | real tokens/s | x walkthrough | peak GiB | MFU | micro-batch x accumulation |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for run in sorted(runs, key=lambda r: r["tokens_per_s"]):
        s = run["settings"]
        shape = f"{s.get('batch', s.get('per_device_batch'))} x {s.get('accum', s.get('grad_accum'))}"
        rows.append(
            f"| {run['system']} | {run['variant']} | {run['tokens_per_s']:,.0f} "
            f"| {run['tokens_per_s'] / reference:.1f} | {run['peak_mem_gib']:.1f} | {run['mfu']:.1%} | {shape} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    runs = load_runs(args.inputs)
    first = runs[0]["env"]
    result = {
        "gpu": first["gpu"],
        "date": first["date"][:10],
        "runs": [{k: r[k] for k in (*KEEP, "source")} for r in runs],
    }
    result["versions"] = {k: v for k, v in first.items() if k not in ("gpu", "device", "date")}
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    walkthrough = next(r["tokens_per_s"] for r in runs if r["system"] == "walkthrough")
    print(table(runs, walkthrough))


if __name__ == "__main__":
    main()

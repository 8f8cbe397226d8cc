"""Collect the runners' JSON lines into `bench/results/<date>-<gpu>.json` and print one markdown table per model and
max length.

python -m bench.report bench/results/raw/2026-11-29-h200-*.jsonl --out bench/results/2026-11-29-h200.json

"x walkthrough" divides by the walkthrough run of the same device call (the rows' `env.call`, set by
bench/run_baselines.sh or `BENCH_CALL`); rows recorded before calls had ids fall back to the walkthrough run of the
same input file, else of that model and max length timed over the most optimizer steps; "-" where there is none.
A row with a call id is never divided by another call's walkthrough: two machines of one GPU type differ by more
than some of the ratios being claimed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KEEP = ("system", "variant", "model", "max_length", "tokens_per_s", "peak_mem_gib", "mfu", "settings")
# Not in issue 7's JSON shape: kept for reading the runs, and the multi-GPU rows' own keys (issue 23).
EXTRA = ("steps_timed", "examples_per_step", "devices", "tokens_per_s_per_device", "scaling_efficiency")


def load_runs(paths: list[str]) -> list[dict]:
    runs = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                run = json.loads(line)
                kept = {key: run[key] for key in KEEP} | {key: run.get(key) for key in EXTRA}
                env = run["env"]
                runs.append({**kept, "source": Path(path).name, "call": env.get("call"), "env": env})
    return runs


def walkthrough_reference(run: dict, group: list[dict]) -> float | None:
    walkthroughs = [r for r in group if r["system"] == "walkthrough"]
    if run["call"]:
        same_call = [r for r in walkthroughs if r["call"] == run["call"]]
        return same_call[0]["tokens_per_s"] if same_call else None
    same_call = [r for r in walkthroughs if r["source"] == run["source"]]
    longest = sorted(walkthroughs, key=lambda r: r["steps_timed"] or 0, reverse=True)
    chosen = (same_call or longest or [None])[0]
    return chosen["tokens_per_s"] if chosen else None


def table(group: list[dict]) -> str:
    rows = [
        "| system | variant | real tokens/s | x walkthrough | peak GiB | MFU | micro-batch x accumulation "
        "| examples/step | call or source |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for run in sorted(group, key=lambda r: r["tokens_per_s"]):
        s = run["settings"]
        shape = f"{s.get('batch', s.get('per_device_batch'))} x {s.get('accum', s.get('grad_accum'))}"
        reference = walkthrough_reference(run, group)
        ratio = f"{run['tokens_per_s'] / reference:.1f}" if reference else "-"
        rows.append(
            f"| {run['system']} | {run['variant']} | {run['tokens_per_s']:,.0f} | {ratio} "
            f"| {run['peak_mem_gib']:.1f} | {run['mfu']:.1%} | {shape} | {run['examples_per_step']} "
            f"| {run['call'] or run['source']} |"
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
        "runs": [{k: r[k] for k in (*KEEP, *EXTRA, "source", "call")} for r in runs],
    }
    result["versions"] = {k: v for k, v in first.items() if k not in ("gpu", "device", "date")}
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    groups: dict[tuple[str, int], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["model"], run["max_length"]), []).append(run)
    for (model, max_length), group in groups.items():
        print(f"\n### {model}, max length {max_length}\n")
        print(table(group))


if __name__ == "__main__":
    main()

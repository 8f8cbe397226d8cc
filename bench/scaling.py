"""Multi-GPU scaling of the CLI itself: `python -m qlora_lit fit --config configs/base.yaml`, DDP on 1, 2, 4, 8 GPUs.

    python -m bench.scaling --shape llama-3.1-8b --devices 1 2 4 8 --out scaling.jsonl

Each device count N is one fit of base.yaml (packed 2048-token rows, varlen attention, compiled layers) with two rows
per micro-batch and max(1, 4 // N) accumulation steps: about 59 examples per optimizer step up to 4 GPUs, the
benchmark's common batch (`base-b2` on one GPU), and twice that on 8. The figures are the CLI's own TrainingMonitor
(real tokens of all ranks over the slowest rank's time, MFU, the largest rank's peak memory), read from the run's
TensorBoard events for the log windows after the first (`--window` optimizer steps each; the first holds compilation).

Model: the random-initialised shape of shapes.py; its tokenizer reads the word `t<id>` as token <id>, so the data are
KoAlpaca-style JSONL rows of such words, their lengths drawn as in data.py (30% instruction, the rest the answer; the
prompt template adds its own tokens). `--cli_args` passes more overrides to every fit (e.g. CPU settings for a smoke
run: `--devices 1 2 --cli_args "--trainer.accelerator cpu --trainer.precision 32-true ..."`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from bench import common, shapes
from bench import data as bench_data

ROOT = Path(__file__).resolve().parents[1]
SERIES = ("throughput/tokens_per_s", "throughput/step_time_s", "throughput/samples_per_s", "throughput/mfu")


def write_text_data(path: Path, n: int, max_length: int, seed: int = 1234) -> Path:
    """KoAlpaca-style rows whose words are token ids of the stand-in tokenizer, lengths as in data.py."""
    if path.is_file():
        return path
    rng = np.random.default_rng(seed + 1)
    rows = []
    for length in bench_data.make_lengths(n, max_length, seed).tolist():
        words = [f"t{i}" for i in rng.integers(1, shapes.FIRST_SPECIAL_ID, size=length)]
        cut = max(1, round(bench_data.PROMPT_FRACTION * length))
        rows.append({"instruction": " ".join(words[:cut]), "output": " ".join(words[cut:])})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def fit(devices: int, model_dir: str, data_path: Path, a: argparse.Namespace) -> Path:
    """One CLI fit on `devices` GPUs; its run folder."""
    out = Path(a.work_dir)
    command = [sys.executable, "-m", "qlora_lit", "fit", "--config", str(ROOT / "configs" / "base.yaml")]
    overrides = {
        "model.model_name_or_path": model_dir,
        "data.path": str(data_path),
        "data.max_length": a.max_length,
        "data.batch_size": 2,
        "trainer.accumulate_grad_batches": max(1, 4 // devices),
        "trainer.devices": devices,
        "trainer.max_steps": a.window * (a.windows + 1),
        "trainer.log_every_n_steps": a.window,
        "trainer.limit_val_batches": 0,
        "trainer.enable_progress_bar": "false",
        "trainer.logger.init_args.save_dir": str(out),
        "trainer.logger.init_args.name": a.shape,
        "trainer.logger.init_args.version": f"devices{devices}",
        "samples.prompts": "[]",
    }
    if torch.cuda.is_available():  # MFU over the benchmark's measured peak, as in its other tables
        overrides["monitor.peak_tflops"] = common.H200_BF16_PEAK_TFLOPS
    command += [item for key, value in overrides.items() for item in (f"--{key}", str(value))]
    command += shlex.split(a.cli_args)
    run = out / a.shape / f"devices{devices}"
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "fit.log", "w") as log:
        code = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"fit on {devices} device(s) failed ({code}); see {run / 'fit.log'}")
    return run


def measured(run: Path, window: int) -> dict:
    """Tokens/s over the log windows after the first, weighted by their time; MFU likewise; the peak memory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    series = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in SERIES if tag in tags}
    steps = sorted(step for step in series.get("throughput/tokens_per_s", {}) if step > window)
    if not steps:
        raise SystemExit(f"{run} logged no throughput after step {window} (did the fit train past its first window?)")
    seconds = [series["throughput/step_time_s"][step] * window for step in steps]
    total = sum(seconds)

    def weighted(tag: str) -> float | None:
        values = series.get(tag)
        return sum(values[step] * s for step, s in zip(steps, seconds, strict=True)) / total if values else None

    peak = [e.value for e in events.Scalars("memory/peak_allocated_gib")] if "memory/peak_allocated_gib" in tags else []
    return {
        "tokens_per_s": weighted("throughput/tokens_per_s"),
        "mfu": weighted("throughput/mfu"),
        "peak_mem_gib": max(peak) if peak else None,
        "steps_timed": len(steps) * window,
        "seconds_timed": total,
        "rows_per_step": weighted("throughput/samples_per_s") * total / (len(steps) * window),  # packed rows
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3.1-8b", choices=sorted(shapes.SHAPES))
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--n_examples", type=int, default=16384, help="rows of the data (an epoch should outlast the run)")
    p.add_argument("--window", type=int, default=10, help="optimizer steps per log window")
    p.add_argument("--windows", type=int, default=2, help="log windows timed after the first")
    p.add_argument("--work_dir", default=os.path.join(common.CACHE, "scaling"))
    p.add_argument("--model_device", default="cuda", help="where shapes.py builds the random weights")
    p.add_argument("--cli_args", default="", help="more overrides for every fit, as one string")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    a = p.parse_args()
    for name in ("devices", "window", "windows"):
        values = getattr(a, name) if name == "devices" else [getattr(a, name)]
        if any(value < 1 for value in values):
            p.error(f"--{name} must be at least 1, got {getattr(a, name)}")
    model_dir = shapes.build_model_dir(a.shape, common.default_model_dir(a.shape), a.model_device)
    shapes.make_tokenizer().save_pretrained(model_dir)  # a folder built before the word tokens existed gets them
    data_file = Path(a.work_dir) / f"text-n{a.n_examples}-l{a.max_length}.jsonl"
    data_path = write_text_data(data_file, a.n_examples, a.max_length)
    single = None
    for devices in a.devices:
        run = fit(devices, model_dir, data_path, a)
        result = measured(run, a.window)
        single = single or (result["tokens_per_s"] if devices == 1 else None)
        line = {
            "system": "qlora_lit",
            "variant": f"cli-base-b2-ddp{devices}",
            "model": a.shape,
            "max_length": a.max_length,
            "devices": devices,
            **result,
            "tokens_per_s_per_device": result["tokens_per_s"] / devices,
            "scaling_efficiency": result["tokens_per_s"] / (single * devices) if single else None,
            "settings": {
                "config": "configs/base.yaml",
                "batch": 2,
                "accum": max(1, 4 // devices),
                "strategy": "ddp (Lightning's choice for several devices)",
                "window": a.window,
                "cli_args": a.cli_args,
            },
            "env": {
                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                **common.versions(),
            },
        }
        common.emit(line, a.out)


if __name__ == "__main__":
    main()

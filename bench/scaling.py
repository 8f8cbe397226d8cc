"""Multi-GPU scaling of the CLI itself: `python -m qlora_lit fit --config configs/base.yaml`, DDP on 1, 2, 4, 8 GPUs.

    python -m bench.scaling --shape llama-3.1-8b --devices 1 2 4 8 --out scaling.jsonl                    # weak
    python -m bench.scaling --shape llama-3.1-8b --devices 1 2 4 8 --scaling strong --out scaling.jsonl   # strong

Each device count N is one fit of base.yaml (packed 2048-token rows, varlen attention, compiled layers) with two rows
per micro-batch on each GPU. Weak scaling (the default, the way a user adds GPUs) keeps each GPU's share of a step:
`--accumulate` micro-batches (default 4: 8 rows, about 59 examples, per GPU and step; `base-b2` on one GPU), so a step
trains N times as much on N GPUs. Strong scaling keeps the step: `--global_rows` rows (default 16) over all GPUs, so
each GPU accumulates global_rows / (2 N) micro-batches (8, 4, 2, 1 on 1, 2, 4, 8 GPUs). The device counts run from the
fewest up, and each row's scaling efficiency is its tokens/s over N times the 1-GPU fit's of the same call, or, in a
call without one, of the newest 1-GPU row of the same settings and GPU type in `--out` (null when there is none).
Several GPUs train under qlora_lit's DDP (qlora_lit/ddp.py); `--lightning_ddp` runs them under Lightning's own
DDPStrategy instead, which wraps the model on a side stream, for the comparison.

The figures are the CLI's own TrainingMonitor (real tokens of all ranks over the slowest rank's time, MFU, the largest
rank's peak memory), read from the run's TensorBoard events for the log windows after the first (`--window` optimizer
steps each; the first holds compilation). Each fit logs into `<work_dir>/<shape>/<variant>/`, emptied first. With
`--profile`, each fit trains one more step after the timed ones, traced by bench/step_trace.py on every rank into
`<variant>/profile/rank<N>/` (trace.json.gz, summary.txt).

Model: the random-initialised shape of shapes.py; its tokenizer reads the word `t<id>` as token <id>, so the data are
KoAlpaca-style JSONL rows of such words, their lengths drawn as in data.py (30% instruction, the rest the answer; the
prompt template adds its own tokens). `--cli_args` passes more overrides to every fit (e.g. CPU settings for a smoke
run, docs/PERFORMANCE.md has it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from bench import common, shapes
from bench import data as bench_data

ROOT = Path(__file__).resolve().parents[1]
SERIES = ("throughput/tokens_per_s", "throughput/step_time_s", "throughput/samples_per_s", "throughput/mfu")
ROWS_PER_MICRO_BATCH = 2  # data.batch_size of every fit: base-b2
LIGHTNING_DDP = "lightning.pytorch.strategies.DDPStrategy"


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


def accumulation(devices: int, a: argparse.Namespace) -> int:
    """Micro-batches per optimizer step on each GPU: the GPU's share kept (weak) or the step's rows kept (strong)."""
    if a.scaling == "weak":
        return a.accumulate
    return a.global_rows // (ROWS_PER_MICRO_BATCH * devices)


def lightning_ddp(devices: int, a: argparse.Namespace) -> bool:
    return a.lightning_ddp and devices > 1


def variant(devices: int, a: argparse.Namespace) -> str:
    name = f"cli-base-b2-ddp{devices}"
    if a.scaling == "strong":
        name += f"-global{a.global_rows}"
    return name + ("-lightning-ddp" if lightning_ddp(devices, a) else "")


def strategy(devices: int, a: argparse.Namespace) -> str:
    if devices == 1:
        return "single device (strategy: auto)"
    return LIGHTNING_DDP if lightning_ddp(devices, a) else "qlora_lit.ddp.QLoRADDPStrategy (strategy: auto)"


def fit(devices: int, model_dir: str, data_path: Path, a: argparse.Namespace) -> Path:
    """One CLI fit on `devices` GPUs; its run folder."""
    out = Path(a.work_dir)
    command = [sys.executable, "-m", "qlora_lit", "fit", "--config", str(ROOT / "configs" / "base.yaml")]
    overrides = {
        "model.model_name_or_path": model_dir,
        "data.path": str(data_path),
        "data.max_length": a.max_length,
        "data.batch_size": ROWS_PER_MICRO_BATCH,
        "trainer.accumulate_grad_batches": accumulation(devices, a),
        "trainer.devices": devices,
        "trainer.max_steps": a.window * (a.windows + 1),
        "trainer.log_every_n_steps": a.window,
        "trainer.limit_val_batches": 0,
        "trainer.enable_progress_bar": "false",
        "trainer.logger.init_args.save_dir": str(out),
        "trainer.logger.init_args.name": a.shape,
        "trainer.logger.init_args.version": variant(devices, a),
        "samples.prompts": "[]",
    }
    if torch.cuda.is_available():  # MFU over the benchmark's measured peak, as in its other tables
        overrides["monitor.peak_tflops"] = common.H200_BF16_PEAK_TFLOPS
    if lightning_ddp(devices, a):
        overrides["trainer.strategy.class_path"] = LIGHTNING_DDP
    run = out / a.shape / variant(devices, a)
    if a.profile:  # one more step after the timed windows (logged at none of them), traced on every rank
        overrides["trainer.max_steps"] += 1
        overrides["trainer.callbacks+"] = "bench.step_trace.StepProfiler"
        profiler = {
            "step": a.window * (a.windows + 1),
            "out_dir": run / "profile",
            "accumulate": accumulation(devices, a),
        }
        overrides.update({f"trainer.callbacks.{key}": value for key, value in profiler.items()})
    command += [item for key, value in overrides.items() for item in (f"--{key}", str(value))]
    command += shlex.split(a.cli_args)
    shutil.rmtree(run, ignore_errors=True)  # an earlier call's events in the folder would mix with this one's
    run.mkdir(parents=True)
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


def earlier_single_gpu_row(a: argparse.Namespace, gpu: str | None) -> dict | None:
    """The newest 1-GPU row of these settings on this GPU type in `--out`, for a call without a 1-GPU fit: a command
    on the GPU machines may run 10 minutes, about three fits of the 8B shape, so 1, 2, 4 and 8 GPUs take two calls."""
    if not a.out or not os.path.exists(a.out):
        return None
    with open(a.out) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    wanted = (variant(1, a), a.shape, a.max_length, a.cli_args, gpu)

    def settings(row: dict) -> tuple:
        return row["variant"], row["model"], row["max_length"], row["settings"]["cli_args"], row["env"]["gpu"]

    matches = [row for row in rows if settings(row) == wanted]
    return matches[-1] if matches else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3.1-8b", choices=sorted(shapes.SHAPES))
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--scaling", choices=["weak", "strong"], default="weak", help="keep each GPU's share or the step")
    p.add_argument("--accumulate", type=int, default=4, help="weak: micro-batches of 2 rows per GPU and step")
    p.add_argument("--global_rows", type=int, default=16, help="strong: packed rows per step over all GPUs")
    p.add_argument("--lightning_ddp", action="store_true", help="several GPUs under Lightning's DDPStrategy")
    p.add_argument("--profile", action="store_true", help="trace one more step on every rank (bench/step_trace.py)")
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--n_examples", type=int, default=16384, help="rows of the data (an epoch should outlast the run)")
    p.add_argument("--window", type=int, default=10, help="optimizer steps per log window")
    p.add_argument("--windows", type=int, default=2, help="log windows timed after the first")
    p.add_argument("--work_dir", default=os.path.join(common.CACHE, "scaling"))
    p.add_argument("--model_device", default="cuda", help="where shapes.py builds the random weights")
    p.add_argument("--cli_args", default="", help="more overrides for every fit, as one string")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    a = p.parse_args()
    for name in ("devices", "window", "windows", "accumulate", "global_rows"):
        values = getattr(a, name) if name == "devices" else [getattr(a, name)]
        if any(value < 1 for value in values):
            p.error(f"--{name} must be at least 1, got {getattr(a, name)}")
    uneven = [n for n in a.devices if a.global_rows % (ROWS_PER_MICRO_BATCH * n)]
    if a.scaling == "strong" and uneven:
        p.error(
            f"--global_rows {a.global_rows} does not split into micro-batches of {ROWS_PER_MICRO_BATCH} rows on "
            f"{uneven} GPUs: give a multiple of {ROWS_PER_MICRO_BATCH * max(uneven)}"
        )
    model_dir = shapes.build_model_dir(a.shape, common.default_model_dir(a.shape), a.model_device)
    shapes.make_tokenizer().save_pretrained(model_dir)  # a folder built before the word tokens existed gets them
    data_file = Path(a.work_dir) / f"text-n{a.n_examples}-l{a.max_length}.jsonl"
    data_path = write_text_data(data_file, a.n_examples, a.max_length)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    earlier = None if 1 in a.devices else earlier_single_gpu_row(a, gpu)
    single = earlier["tokens_per_s"] if earlier else None
    reference = {"date": earlier["env"]["date"], "tokens_per_s": single} if earlier else "this call"
    for devices in sorted(set(a.devices)):  # the 1-GPU fit first: the others' efficiency is against it
        run = fit(devices, model_dir, data_path, a)
        result = measured(run, a.window)
        single = single or (result["tokens_per_s"] if devices == 1 else None)
        line = {
            "system": "qlora_lit",
            "variant": variant(devices, a),
            "model": a.shape,
            "max_length": a.max_length,
            "devices": devices,
            **result,
            "tokens_per_s_per_device": result["tokens_per_s"] / devices,
            "scaling_efficiency": result["tokens_per_s"] / (single * devices) if single else None,
            "settings": {
                "config": "configs/base.yaml",
                "scaling": a.scaling,
                "batch": ROWS_PER_MICRO_BATCH,
                "accum": accumulation(devices, a),
                "global_rows": ROWS_PER_MICRO_BATCH * accumulation(devices, a) * devices,
                "strategy": strategy(devices, a),
                "window": a.window,
                "profiled_step_after_the_timed_ones": a.profile,
                "cli_args": a.cli_args,
                "efficiency_against_1_gpu_fit_of": reference if single else None,
            },
            "env": {
                "gpu": gpu,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "call": os.environ.get("BENCH_CALL"),
                **common.versions(),
            },
        }
        common.emit(line, a.out)


if __name__ == "__main__":
    main()

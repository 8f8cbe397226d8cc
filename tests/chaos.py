"""Many interruptions of one demo fit, each resumed with `--ckpt_path last`, next to an uninterrupted run of the same
config (docs/RELIABILITY.md, chaos soak). tests/test_chaos.py runs the short form and checks what it leaves:

    python tests/chaos.py OUT --steps 40 --interruptions 12 --seed 0                    # what CI runs
    python tests/chaos.py OUT --steps 400 --interruptions 100 --seed 7 --async-kills    # the long form, by hand

OUT/reference/ and OUT/chaos/ hold the two runs, OUT/segments.json what happened to each start of the chaos run.

Each fit runs in a process forked from this one (tests/forked.py): the real CLI in a process of its own, without the
Python start-up. An interruption is one of:

- `kill9`: SIGKILL at a chosen step and point of it (before the forward pass, mid-step, after the optimizer step, in
  validation, while a checkpoint is being assembled);
- `kill9-write`: SIGKILL halfway through writing `last.ckpt`, a top-k checkpoint or the adapter (tests/faults.py);
- `sigterm`: SIGTERM, which saves `last.ckpt` at the next step boundary and exits 0;
- `sigusr1`: Slurm's warning, as in a job (SLURM_JOB_ID set): save, `scontrol requeue` (a stand-in records it), exit 0;
- `async-kill9` (long form only): SIGKILL from outside after a random time, wherever the process is.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch

from qlora_lit.resume import newest_whole_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from faults import SignalAt, half_write_then, kill_9  # noqa: E402
from forked import fork_fit, wait, with_callback  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [
    "fit",
    "--config",
    str(ROOT / "configs" / "demo.yaml"),
    "--trainer.val_check_interval",
    "5",  # a validation, a checkpoint and an adapter export every 5 steps
    "--trainer.log_every_n_steps",
    "1",
    "--trainer.enable_progress_bar",
    "false",
    "--samples.prompts",
    "[]",
    "--data.val_size",
    "16",
    "--data.max_length",
    "128",
    "--checkpoint.save_top_k",
    "2",
]
WRITES = ("last.ckpt", "step0", "adapter_model.safetensors")  # step0...: the top-k checkpoints' names


def saved_step(run: Path) -> int:
    """The step `--ckpt_path last` resumes from (its newest whole checkpoint: a kill may have cut last.ckpt's
    latest write short, after the top-k checkpoint of the same step was written)."""
    newest = newest_whole_checkpoint(run / "checkpoints") if (run / "checkpoints").is_dir() else None
    return torch.load(newest, weights_only=True, mmap=True)["global_step"] if newest else 0


def interruption(rng: random.Random, done: int, steps: int, span: int, kinds: list[str]) -> dict:
    """A random interruption of the next start, within `span` steps of step `done`."""
    kind = rng.choice(kinds)
    plan = {"kind": kind}
    if kind == "kill9-write":
        plan.update(write=rng.choice(WRITES), nth=rng.randint(1, 2))
    elif kind == "async-kill9":
        plan.update(after_s=round(rng.uniform(1.0, 12.0), 2))
    else:
        plan.update(step=rng.randint(done + 1, min(done + span, steps)), hook=rng.choice(SignalAt.HOOKS))
        if kind != "kill9":  # a signal with a handler: the hook that matters is where it arrives, any will do
            plan["hook"] = rng.choice(("on_train_batch_start", "on_before_backward", "on_validation_batch_start"))
    return plan


def start(plan: dict | None, args: list[str], log: Path, requeue_bin: Path) -> int:
    env, fault = {}, None
    kind = plan and plan["kind"]
    if kind == "kill9-write":
        fault = lambda: half_write_then(kill_9, plan["write"], plan["nth"])  # noqa: E731
    elif kind in ("kill9", "sigterm", "sigusr1"):
        signum = {"kill9": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigusr1": signal.SIGUSR1}[kind]
        fault = lambda: with_callback(SignalAt(plan["step"], signum, plan["hook"]))  # noqa: E731
    if kind == "sigusr1":  # a Slurm job as PreemptionCheckpoint sees it; scontrol is a stand-in that records its call
        env = {"SLURM_JOB_ID": "4242", "PATH": f"{requeue_bin}{os.pathsep}{os.environ['PATH']}"}
    pid = fork_fit(args, log, env, fault)
    code = wait(pid, timeout_s=plan["after_s"]) if kind == "async-kill9" else None
    if kind == "async-kill9" and code is None:
        os.kill(pid, signal.SIGKILL)
    return wait(pid) if code is None else code


def soak(out: Path, steps: int, interruptions: int, seed: int, kinds: list[str]) -> list[dict]:
    args = [*SETTINGS, "--trainer.max_steps", str(steps)]
    reference = out / "reference"
    reference.mkdir(parents=True)
    code = wait(fork_fit([*args, "--trainer.logger.init_args.save_dir", str(reference / "runs")], out / "ref.log"))
    assert code == 0, (out / "ref.log").read_text()[-3000:]

    chaos = out / "chaos"
    requeue_bin = out / "bin"
    requeue_bin.mkdir()
    scontrol = requeue_bin / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {out / "requeued.txt"}\n')
    scontrol.chmod(0o755)
    # One folder, as the Slurm scripts give a job (slurm-<job id>): a start killed before the run's first checkpoint
    # leaves nothing to continue, and its requeued job starts over in the same folder.
    args += ["--trainer.logger.init_args.save_dir", str(chaos / "runs"), "--trainer.logger.init_args.version", "job"]
    args += ["--ckpt_path", "last"]
    run = chaos / "runs" / "demo" / "job"
    rng = random.Random(seed)
    segments: list[dict] = []
    while True:
        done = saved_step(run)
        delivered = sum(segment["interrupted"] for segment in segments)
        wanted = delivered < interruptions and done < steps
        plan = interruption(rng, done, steps, max(3, steps // interruptions), kinds) if wanted else None
        began = time.monotonic()
        code = start(plan, args, out / "chaos.log", requeue_bin)
        interrupted = code != 0 or (saved_step(run) < steps)
        segments.append(
            {
                "from": done,
                "plan": plan,
                "exit": code,
                "to": saved_step(run),
                "interrupted": interrupted,
                "seconds": round(time.monotonic() - began, 1),
            }
        )
        if code not in (0, -signal.SIGKILL):
            raise AssertionError(
                f"start {len(segments)} ended with {code}: {segments[-1]}\n" + (out / "chaos.log").read_text()[-4000:]
            )
        if plan is None and code == 0 and saved_step(run) == steps:
            return segments
        if len(segments) > 4 * interruptions + 10:
            raise AssertionError(f"the run does not finish: {segments}")
        (out / "segments.json").write_text(json.dumps({"segments": segments}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--interruptions", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--async-kills", action="store_true", help="also SIGKILL from outside at random times")
    options = parser.parse_args()
    kinds = ["kill9", "kill9", "kill9-write", "sigterm", "sigusr1"]
    kinds += ["async-kill9"] * 2 if options.async_kills else []
    began = time.monotonic()
    segments = soak(options.out, options.steps, options.interruptions, options.seed, kinds)
    summary = {"seconds": round(time.monotonic() - began, 1), "segments": segments}
    (options.out / "segments.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

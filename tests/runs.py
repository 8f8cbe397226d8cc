"""Fits in child processes, and the checkpoints they leave: for the test suite (through conftest) and for
tests/fsdp_shared_gpu.py, which runs on the GPU machine without pytest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = str(ROOT / "configs" / "demo.yaml")


def fit_in_subprocess(
    folder: Path, *args: str, entry: tuple[str, ...] = ("-m", "qlora_lit"), timeout: float = 900
) -> Path:
    """`fit` of the demo config with `args` in a child process (several ranks need their own processes), logging
    under `folder` (the child's output goes to folder/log.txt); returns the run folder. The child sees no Slurm job's
    variables (they would redirect Lightning) and uses one thread per process: two ranks share the 2 cores of the
    CPU machine, and runs repeat bit for bit. Raises RuntimeError with the end of the log when the fit fails."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    paths = [str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")]
    env.update(PYTHONPATH=os.pathsep.join(path for path in paths if path), OMP_NUM_THREADS="1")
    command = [sys.executable, *entry, "fit", "--config", DEMO_CONFIG, *args]
    command += ["--trainer.logger.init_args.save_dir", str(folder), "--trainer.enable_progress_bar", "false"]
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "log.txt"
    with open(log, "w") as output:
        result = subprocess.run(command, cwd=folder, env=env, stdout=output, stderr=subprocess.STDOUT, timeout=timeout)
    if result.returncode:
        raise RuntimeError(f"fit in {folder} failed (exit code {result.returncode}):\n{log.read_text()[-4000:]}")
    return folder / "demo" / "version_0"


def checkpoint_at(run: Path, step: int) -> dict:
    """The checkpoint a run saved at `step` (qlora_lit's file names start with the step), loaded onto the CPU."""
    (path,) = (run / "checkpoints").glob(f"step{step:06d}-*.ckpt")
    return torch.load(path, weights_only=True, map_location="cpu")


def peft_key(checkpoint_key: str) -> str:
    """A checkpoint's adapter key (`model.` prefix, the adapter's name) as PEFT's adapter file spells it."""
    return checkpoint_key.removeprefix("model.").replace(".default.", ".")

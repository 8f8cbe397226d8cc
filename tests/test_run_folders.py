"""Two runs, one folder: fits of one config started at the same moment get folders of their own and write nothing into
each other's; `--ckpt_path last` never continues a run another fit is writing (docs/RELIABILITY.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from jsonargparse import Namespace
from lightning.pytorch.loggers import TensorBoardLogger
from safetensors.torch import load_file

from qlora_lit.errors import ConfigError
from qlora_lit.resume import continue_newest_run
from qlora_lit.run_folder import lock_run, release_runs, take_new_run_folder

ROOT = Path(__file__).resolve().parents[1]


def test_two_runs_numbered_at_the_same_moment_get_two_folders(tmp_path):
    first, second = (TensorBoardLogger(tmp_path, name="demo") for _ in range(2))
    # Lightning numbers a run by listing the folder: two fits doing it before either wrote took the same number.
    assert first._get_next_version() == second._get_next_version() == 0
    take_new_run_folder(first)
    take_new_run_folder(second)
    release_runs()
    assert (first.version, second.version) == (0, 1)
    assert sorted(path.name for path in (tmp_path / "demo").iterdir()) == ["version_0", "version_1"]


def test_a_run_another_fit_is_writing_is_not_continued(tmp_path):
    run = tmp_path / "demo" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"a checkpoint")
    lock_run(run)  # a fit that is still running holds it (another process, or this one: flock locks conflict alike)
    logger = Namespace(
        class_path="TensorBoardLogger", init_args=Namespace(save_dir=str(tmp_path), name="demo", version=None)
    )
    try:
        with pytest.raises(
            ConfigError, match=f"{run} is being written by a fit that is still running \\(pid {os.getpid()}"
        ):
            continue_newest_run(logger)
    finally:
        release_runs()
    continue_newest_run(logger)  # once it has ended, the run is continued
    release_runs()
    assert logger.init_args.version == "version_0"


def together(out: Path, count: int, *args: str) -> None:
    """`count` demo fits started at the same moment, phase after phase (tests/together.py); all must succeed."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", OMP_NUM_THREADS="1")
    command = [sys.executable, str(ROOT / "tests" / "together.py"), str(out), str(count), *args]
    subprocess.run(command, env=env, check=True, timeout=600)
    for phase, exits in enumerate(json.loads((out / "exits.json").read_text())):
        failed = [(out / f"{phase}-{i}.log").read_text()[-3000:] for i, code in enumerate(exits) if code]
        assert not failed, failed


@pytest.mark.slow
def test_fits_started_together_write_into_folders_of_their_own_and_resume_their_own(tmp_path):
    short = ["--trainer.val_check_interval", "2", "--samples.prompts", "[]", "--data.val_size", "8"]
    fresh = [*short, "--trainer.max_steps", "4", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    # Two jobs of an array that each continue their own run: the Slurm scripts give each job a folder of its own
    # (--trainer.logger.init_args.version slurm-<job id>), and a requeued job continues it.
    jobs = [*short, "--trainer.logger.init_args.save_dir", str(tmp_path / "jobs"), "--trainer.logger.init_args.version"]
    jobs += ["job-{i}", "--ckpt_path", "last", "--trainer.max_steps"]
    together(tmp_path / "out", 2, *fresh, "--then", *jobs, "2", "--then", *jobs, "4")

    runs = sorted((tmp_path / "runs" / "demo").iterdir())
    assert [run.name for run in runs] == ["version_0", "version_1"]
    for run in runs:  # each run's events come from one process: its own
        assert len({path.name.split(".")[-2] for path in run.glob("events.out.tfevents.*")}) == 1
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert len({path.name.split(".")[-2] for run in runs for path in run.glob("events.out.tfevents.*")}) == 2
    adapters = [load_file(run / "adapter" / "adapter_model.safetensors") for run in runs]  # same config and seed
    assert all(torch.equal(adapters[0][key], adapters[1][key]) for key in adapters[0])

    for i in range(2):
        log = (tmp_path / "out" / f"2-{i}.log").read_text()
        own = tmp_path / "jobs" / "demo" / f"job-{i}" / "checkpoints"
        assert f"Restoring states from the checkpoint path at {own / 'last.ckpt'}" in log, log[-3000:]
        assert torch.load(own / "last.ckpt", weights_only=True)["global_step"] == 4

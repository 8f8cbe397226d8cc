"""DDP on CPU (gloo): two ranks with batch b take the same step as one process with batch 2b, and a resumed
two-rank run continues exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEMO_CONFIG, checkpoint_at, fit_in_subprocess
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qlora_lit.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]


def gradients(tmp_path: Path, devices: int, batch_size: int) -> dict[str, torch.Tensor]:
    out = tmp_path / f"grads-{devices}.pt"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    for key in [k for k in env if k.startswith("SLURM_")]:  # a Slurm job's variables would redirect Lightning
        del env[key]
    command = [sys.executable, str(ROOT / "tests" / "ddp_step.py"), "--devices", str(devices)]
    result = subprocess.run(
        [*command, "--batch_size", str(batch_size), "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.slow
def test_two_ranks_step_like_one_process_with_twice_the_batch(tmp_path):
    one = gradients(tmp_path, devices=1, batch_size=4)
    two = gradients(tmp_path, devices=2, batch_size=2)
    assert one.keys() == two.keys() and one
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.slow
def test_two_rank_resume_ends_exactly_where_the_uninterrupted_run_ends(tmp_path, monkeypatch):
    """Each rank's random stream (LoRA dropout) is saved and restored: the ranks draw different amounts (their
    batches differ), so rank 0's stream alone would change rank 1's dropout masks after a resume."""
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.val_check_interval", "2"]
    ddp += ["--samples.prompts", "[]", "--trainer.max_steps", "4"]
    full = fit_in_subprocess(tmp_path / "full", *ddp)
    assert [run.name for run in full.parent.iterdir()] == ["version_0"]  # rank 1 made no folder of its own
    ckpt = next((full / "checkpoints").glob("step000002-*.ckpt"))
    resumed = fit_in_subprocess(tmp_path / "resumed", *ddp, "--ckpt_path", str(ckpt))
    expected = checkpoint_at(full, 4)["state_dict"]
    for key, value in checkpoint_at(resumed, 4)["state_dict"].items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    # Each rank validated its own share of the rows: together, the loss one process computes on the whole set.
    events = EventAccumulator(str(full), size_guidance={"scalars": 0})
    events.Reload()
    logged = {event.step: event.value for event in events.Scalars("val_loss")}
    monkeypatch.setattr(sys, "argv", ["qlora_lit"])
    (step_4,) = (full / "checkpoints").glob("step000004-*.ckpt")
    one = ["validate", "--config", DEMO_CONFIG, "--samples.prompts", "[]", "--ckpt_path", str(step_4)]
    cli = cli_main([*one, "--trainer.logger.init_args.save_dir", str(tmp_path / "one-process")])
    assert sorted(logged) == [1, 3], logged  # the validations after steps 2 and 4, at Lightning's step numbers
    assert logged[max(logged)] == pytest.approx(cli.trainer.callback_metrics["val_loss"].item(), rel=1e-5)

"""DDP on CPU (gloo): two ranks with batch b take the same step as one process with batch 2b."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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

"""SIGTERM outside Slurm: the run saves a resumable checkpoint at an optimizer-step boundary and exits cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sigterm_saves_last_checkpoint_and_the_run_resumes_from_it(tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    env["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, "-m", "qlora_lit", "fit", "--config", str(ROOT / "configs" / "demo.yaml")]
    short = ["--trainer.max_steps", "40", "--trainer.enable_progress_bar", "false", "--samples.prompts", "[]"]
    process = subprocess.Popen(
        [*command, *short], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = []
    for line in process.stdout:
        output.append(line)
        if "trainable parameters" in line:
            time.sleep(3)
            process.send_signal(signal.SIGTERM)
            break
    output += process.stdout.readlines()
    assert process.wait(timeout=120) == 0, "".join(output)[-3000:]
    log = "".join(output)
    assert "received SIGTERM: saving" in log, log[-3000:]
    checkpoint = tmp_path / "runs" / "demo" / "version_0" / "checkpoints" / "last.ckpt"
    stopped_at = torch.load(checkpoint, weights_only=True)["global_step"]
    assert 0 < stopped_at < 40

    resumed = subprocess.run(
        [*command, *short, "--ckpt_path", str(checkpoint)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"after {stopped_at} batches" in resumed.stderr + resumed.stdout

"""Chaos soak: one demo fit interrupted again and again (kill -9 at chosen points and mid-write of checkpoints and the
adapter, SIGTERM, Slurm's SIGUSR1), each time resumed with `--ckpt_path last` (tests/chaos.py), ends as the
uninterrupted run does: the same adapter bit for bit, one TensorBoard series per metric with the same steps (and the
same values, where they do not measure time), and no half-written file (docs/RELIABILITY.md).

CI runs the short form (40 steps, 12 interruptions, under a minute). The long form, by hand:

    QLORA_LIT_SOAK=long python -m pytest tests/test_chaos.py     # 400 steps, 100 interruptions, external kills too
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qlora_lit.checkpoint_io import check_checkpoint_file

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--steps", "40", "--interruptions", "12", "--seed", "0"]
LONG = ["--steps", "400", "--interruptions", "100", "--seed", "7", "--async-kills"]
TIMED = ("throughput/", "memory/")  # wall-clock measurements: their values differ from run to run


def series(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series as TensorBoard shows it (events of killed processes after their checkpoint purged)."""
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def soak(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("soak")
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", OMP_NUM_THREADS="1")
    settings = LONG if os.environ.get("QLORA_LIT_SOAK") == "long" else SHORT
    command = [sys.executable, str(ROOT / "tests" / "chaos.py"), str(out / "soak"), *settings]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=7200)
    assert result.returncode == 0, result.stderr[-5000:]
    return out / "soak"


@pytest.mark.slow
def test_every_kind_of_interruption_happened_and_each_start_ended_as_planned(soak):
    segments = json.loads((soak / "segments.json").read_text())["segments"]
    interrupted = [segment for segment in segments if segment["interrupted"]]
    assert len(interrupted) >= 12
    kinds = Counter(segment["plan"]["kind"] for segment in interrupted)
    assert {"kill9", "kill9-write", "sigterm", "sigusr1"} <= kinds.keys(), kinds
    writes = {segment["plan"]["write"] for segment in interrupted if segment["plan"]["kind"] == "kill9-write"}
    assert {"last.ckpt", "adapter_model.safetensors"} & writes, writes
    for segment in interrupted:
        expected = 0 if segment["plan"]["kind"] in ("sigterm", "sigusr1") else -9
        assert segment["exit"] == expected, segment
    requeues = (soak / "requeued.txt").read_text().splitlines()
    assert requeues == ["requeue 4242"] * kinds["sigusr1"]  # each SIGUSR1 asked Slurm to requeue the job


@pytest.mark.slow
def test_the_interrupted_run_ends_with_the_uninterrupted_runs_adapter(soak):
    expected = load_file(soak / "reference" / "runs" / "demo" / "version_0" / "adapter" / "adapter_model.safetensors")
    got = load_file(soak / "chaos" / "runs" / "demo" / "job" / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.slow
def test_tensorboard_shows_one_continuous_series_per_metric(soak):
    expected = series(soak / "reference" / "runs" / "demo" / "version_0")
    got = series(soak / "chaos" / "runs" / "demo" / "job")
    assert expected.keys() == got.keys() and "train_loss" in got and "val_loss" in got
    for tag, points in expected.items():
        steps = [step for step, _ in got[tag]]
        assert steps == [step for step, _ in points], tag  # none missing, none extra
        # Lightning logs `epoch` with both the training and the validation metrics of a step: twice there, always.
        assert len(set(steps)) == len(steps) or tag == "epoch", tag
        if not tag.startswith(TIMED):
            assert got[tag] == points, tag


@pytest.mark.slow
def test_no_checkpoint_or_adapter_is_left_half_written(soak):
    run = soak / "chaos" / "runs" / "demo" / "job"
    assert [path.name for path in (soak / "chaos" / "runs" / "demo").iterdir()] == ["job"]
    assert [path for path in run.rglob("*") if path.name.endswith((".partial", ".old"))] == []
    checkpoints = {path.name for path in (run / "checkpoints").iterdir()}
    reference = soak / "reference" / "runs" / "demo" / "version_0" / "checkpoints"
    # The uninterrupted run's top-k and last checkpoints, and perhaps a top-k one a start resumed from (Lightning
    # never deletes the checkpoint a run resumed from), all whole.
    assert {path.name for path in reference.iterdir()} <= checkpoints
    for name in checkpoints:
        check_checkpoint_file(run / "checkpoints" / name)
    load_file(run / "adapter" / "adapter_model.safetensors")
    assert json.loads((run / "adapter" / "trainer_state.json").read_text())["global_step"] == 40 or (
        os.environ.get("QLORA_LIT_SOAK") == "long"
    )

"""A rank that dies, freezes or raises stops the other ranks of a DDP or FSDP fit within seconds, with one message that
names it and says what to do; not gloo's raw "Connection closed by peer" traceback, nor, over NCCL, after the
collective timeout (qlora_lit/rank_watch.py, docs/RELIABILITY.md). Two-rank fits on CPUs over gloo."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WHOLE = "the checkpoints already written are whole: resume with --ckpt_path last"
# scenario: the ranks' exit codes (75: another rank was lost; 1: another rank failed), the survivor's message
SCENARIOS = {
    "kill9-rank1": ([75, -9], rf"rank 1 \(pid \d+ on \S+\) ended without a word \(killed: .*Rank 0 stops too; {WHOLE}"),
    "kill9-rank0": ([-9, 75], rf"rank 0 \(pid \d+ on \S+\) ended without a word \(killed: .*Rank 1 stops too; {WHOLE}"),
    "stop-rank0": ([-9, 75], r"rank 0 \(pid \d+ on \S+\) has not answered for \d+ s \(it hangs, .*Rank 1 stops too"),
    "raise-rank1": (
        [1, 1],
        r"rank 1 \(pid \d+ on \S+\) failed: RuntimeError: a bad batch \(injected at step 3\)\. Rank 0 stops too; its "
        r"error is in its own output",
    ),
    "fsdp-kill9-rank1": ([75, -9], rf"rank 1 \(pid \d+ on \S+\) ended without a word .*Rank 0 stops too; {WHOLE}"),
}


def child_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", OMP_NUM_THREADS="1")
    return env


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """Every scenario, one after the other, in tests/dying_ranks.py (one Python start-up for all)."""
    out = tmp_path_factory.mktemp("ranks")
    command = [sys.executable, str(ROOT / "tests" / "dying_ranks.py"), str(out), *SCENARIOS]
    result = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads((out / "report.json").read_text())


def survivor_output(log: str) -> str:
    return "\n".join(line for line in log.splitlines() if line.startswith("qlora_lit: training stopped"))


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_the_other_rank_stops_within_seconds_naming_the_failed_one(report, scenario):
    exits, message = SCENARIOS[scenario]
    result = report[scenario]
    log = Path(result["log"]).read_text()
    assert result["exits"] == exits, log[-4000:]
    assert result["seconds"] < 30, result  # the silence limit is 5 s here; 30 s by default
    assert re.search(message, survivor_output(log)), log[-4000:]
    assert "pair.cc" not in log and "Connection closed by peer" not in log  # gloo's raw error never reaches the user


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as listing:
        return [int(child) for child in listing.read().split()]


@pytest.mark.slow
def test_a_rank_killed_under_lightnings_own_launcher_is_named_before_anything_is_killed(tmp_path):
    """`fit --trainer.devices 2` on one machine: Lightning's launcher starts rank 1 and would kill every process within
    5 seconds of its death, without a word; rank 0 names it first."""
    command = [sys.executable, "-m", "qlora_lit", "fit", "--config", str(ROOT / "configs" / "demo.yaml")]
    command += ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "300"]
    command += [
        "--trainer.val_check_interval",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--samples.prompts",
        "[]",
    ]
    command += ["--data.val_size", "8", "--trainer.logger.init_args.save_dir", str(tmp_path)]
    with open(tmp_path / "log.txt", "w") as log:
        main = subprocess.Popen(command, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("demo/version_0/checkpoints/step000002*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    (rank_1,) = children(main.pid)
    os.kill(rank_1, signal.SIGKILL)
    began = time.monotonic()
    code = main.wait(timeout=120)
    output = (tmp_path / "log.txt").read_text()
    assert code == 75 and time.monotonic() - began < 10, output[-4000:]
    assert re.search(rf"rank 1 \(pid {rank_1} on \S+\) ended without a word .*Rank 0 stops too; {WHOLE}", output)


def test_a_rank_knows_rank_0s_pid_from_its_start():
    """A frozen rank 0 freezes the store it hosts: whatever the other ranks have not asked it by then, they cannot ask.
    Rank 0's identity is read as the watch starts, so the message names its pid even when it hangs before the
    watch's first round (a CI run once printed "rank 0 has not answered" without it)."""
    from datetime import timedelta

    import torch.distributed as dist

    from qlora_lit.rank_watch import Watcher

    store = dist.HashStore()
    store.set_timeout(timedelta(seconds=5))
    first = Watcher(store, rank=0, world_size=2, silence_s=5)
    second = Watcher(store, rank=1, world_size=2, silence_s=5)  # not started: no round has run
    assert second.describe(0) == f" (pid {os.getpid()} on {first.known[0][0]})"


def test_rank_0_killed_between_two_looks_is_named_as_killed(monkeypatch):
    """Rank 0 killed after the watch's look at its process and before its next store call: the store fails first
    (a killed process's sockets close before it shows as ended), and the verdict is still that it ended, not only
    that its store fails (a CI run once printed the latter for kill -9 of rank 0)."""
    import socket
    from datetime import timedelta

    import torch.distributed as dist

    from qlora_lit import rank_watch

    rank0 = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    store = dist.HashStore()
    store.set_timeout(timedelta(seconds=1))
    store.set("who/0", f"{socket.gethostname()} {rank0.pid} {rank_watch._pid_space()}")
    watcher = rank_watch.Watcher(store, rank=1, world_size=2, silence_s=5)

    class KilledStore:  # the next store call: rank 0 dies, its store with it
        def add(self, key, value):
            rank0.kill()
            raise ConnectionResetError("Connection reset by peer")

    verdicts = []
    watcher.store = KilledStore()
    monkeypatch.setattr(watcher, "stop_for", lambda verdict, store_alive=True: verdicts.append(verdict))
    monkeypatch.setattr(rank_watch, "HEARTBEAT_S", 0.01)
    try:
        watcher.run()
    finally:
        rank0.kill()
        rank0.wait()
    assert verdicts == [f"rank 0 (pid {rank0.pid} on {socket.gethostname()}) {rank_watch.ENDED}"]

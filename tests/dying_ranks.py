"""Two-rank demo fits on CPUs (gloo) in which one rank dies, freezes or raises once training runs; the other must stop
within seconds, naming it (qlora_lit/rank_watch.py). tests/test_rank_failure.py runs it:

    python tests/dying_ranks.py OUT SCENARIO [SCENARIO ...]

Scenarios: kill9-rank1, kill9-rank0 (rank 0 hosts the run's store), stop-rank0 (SIGSTOP: alive but silent, what NCCL
cannot see), raise-rank1 (its training step raises), fsdp-kill9-rank1 (the CPU FSDP harness, tests/fsdp_cpu.py).
The ranks are forked from this process with the variables a launcher sets (LOCAL_RANK, MASTER_PORT, ...), as srun or
torchrun start them. OUT/report.json: per scenario, the ranks' exit codes, the seconds from the fault to the end of
the last rank, and where the log is.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from faults import raise_in_rank  # noqa: E402
from forked import fork_together, wait  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIT = ["fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--trainer.devices", "2", "--trainer.max_steps", "300"]
FIT += ["--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false", "--samples.prompts", "[]"]
FIT += ["--data.val_size", "16", "--rank_watch.silence_s", "5"]
DDP = ["--trainer.strategy", "ddp"]
FSDP = ["--config", str(ROOT / "configs" / "fsdp.yaml"), "--trainer.strategy.class_path", "fsdp_cpu.CPUFSDPStrategy"]
FSDP += ["--trainer.accelerator", "cpu", "--model.quantization.compute_dtype", "bfloat16"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(out: Path, scenario: str) -> dict:
    folder = out / scenario
    log = folder / "log.txt"
    folder.mkdir(parents=True)
    args = [*FIT, *(FSDP if scenario.startswith("fsdp") else DDP), "--trainer.logger.init_args.save_dir", str(folder)]
    port = str(free_port())
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "NODE_RANK": "0"}
    raising = (lambda: raise_in_rank(1, 3)) if scenario == "raise-rank1" else None
    pids = fork_together([(args, log, {**env, "LOCAL_RANK": str(rank)}) for rank in (0, 1)], before=raising)
    checkpoints = folder / "demo" / "version_0" / "checkpoints"
    deadline = time.monotonic() + 240
    while not list(checkpoints.glob("step000002*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    victim, exits = (0 if scenario.endswith("rank0") else 1), {}
    fault = {"kill9": signal.SIGKILL, "stop": signal.SIGSTOP}.get(scenario.removeprefix("fsdp-").split("-")[0])
    if fault is not None:
        os.kill(pids[victim], fault)
    else:  # it raises on its own: measure from its end
        exits[victim] = wait(pids[victim], timeout_s=120)
    began = time.monotonic()
    exits[1 - victim] = wait(pids[1 - victim], timeout_s=120)
    seconds = time.monotonic() - began
    for rank, pid in enumerate(pids):  # what is left (a frozen or hanging rank) goes
        if exits.get(rank) is None:
            os.kill(pid, signal.SIGKILL)
            exits[rank] = wait(pid)
    return {"exits": [exits[0], exits[1]], "seconds": round(seconds, 1), "log": str(log)}


def main() -> None:
    out, scenarios = Path(sys.argv[1]), sys.argv[2:]
    report = {scenario: run(out, scenario) for scenario in scenarios}
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

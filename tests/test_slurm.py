"""Real-Slurm tests: srun rank layout, SIGUSR1 delivery to srun tasks, self-requeue.

They run against a private single-node cluster started by the ``slurm_cluster`` fixture
(tests/slurm_cluster.py) and skip when Slurm/munge are not installed (.ci/install-slurm.sh).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import slurm_cluster_fixture  # noqa: E402,F401  (the `slurm_cluster` fixture)

pytestmark = pytest.mark.slurm


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body).lstrip())
    path.chmod(0o755)
    return path


def test_srun_two_ranks(slurm_cluster, tmp_path):
    script = _script(
        tmp_path / "ranks.sbatch",
        """
        #SBATCH --job-name=ranks
        #SBATCH --nodes=1
        #SBATCH --ntasks=2
        #SBATCH --output=ranks-%j.out
        set -euo pipefail
        echo "python=$(command -v python)"
        srun --ntasks=2 python -c "import os, sys; print('rank', os.environ['SLURM_PROCID'], sys.prefix, flush=True)"
    """,
    )
    job = slurm_cluster.submit(script, cwd=tmp_path)
    slurm_cluster.wait_for(job, "COMPLETED", timeout=60)
    out = slurm_cluster.read_output(job)
    assert slurm_cluster.output_path(job) == tmp_path / f"ranks-{job}.out"
    ranks = sorted(line.split()[1] for line in out.splitlines() if line.startswith("rank "))
    assert ranks == ["0", "1"], out
    # Jobs inherit the submitting environment: `python` is the interpreter running pytest.
    assert f"python={Path(sys.executable).parent}/python" in out, out
    assert all(line.split()[2] == sys.prefix for line in out.splitlines() if line.startswith("rank ")), out


SIGNAL_TASK = """
import os, signal, subprocess, sys, time

rank = os.environ["SLURM_PROCID"]
restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
print(f"rank {rank} start restart_count={restarts}", flush=True)
if restarts != "0":
    print(f"rank {rank} resumed", flush=True)
    sys.exit(0)

def on_usr1(signum, frame):
    print(f"rank {rank} got SIGUSR1", flush=True)
    if rank == "0":  # what Lightning's SLURMEnvironment(auto_requeue=True) does on rank 0
        r = subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]],
                           capture_output=True, text=True)
        print(f"rank {rank} requeue rc={r.returncode} {r.stderr.strip()}", flush=True)

signal.signal(signal.SIGUSR1, on_usr1)
print(f"rank {rank} ready", flush=True)
time.sleep(120)
print(f"rank {rank} was not requeued", flush=True)
sys.exit(3)
"""


def test_sigusr1_reaches_srun_tasks_and_job_requeues_itself(slurm_cluster, tmp_path):
    (tmp_path / "task.py").write_text(SIGNAL_TASK)
    script = _script(
        tmp_path / "requeue.sbatch",
        """
        #SBATCH --job-name=requeue
        #SBATCH --nodes=1
        #SBATCH --ntasks=2
        #SBATCH --requeue
        #SBATCH --open-mode=append
        #SBATCH --output=requeue-%j.out
        trap 'echo "batch shell got SIGUSR1"' USR1
        echo "batch start restart_count=${SLURM_RESTART_COUNT:-0}"
        srun python task.py
        echo "batch end rc=$?"
    """,
    )
    job = slurm_cluster.submit(script, cwd=tmp_path)
    slurm_cluster.wait_for(job, "RUNNING", timeout=30)
    out = slurm_cluster.wait_for_output(job, "rank 1 ready", timeout=30)
    slurm_cluster.wait_for_output(job, "rank 0 ready", timeout=10)

    # No --batch / --full: the signal goes to the tasks of the job steps (what
    # `#SBATCH --signal=SIGUSR1@90` without `B:` does too), not to the batch shell.
    slurm_cluster.cancel(job, "USR1")
    slurm_cluster.wait_for(job, "COMPLETED", timeout=50)  # requeue delay ~10-15 s here
    out = slurm_cluster.read_output(job)

    assert "rank 0 got SIGUSR1" in out and "rank 1 got SIGUSR1" in out, out
    assert "rank 0 requeue rc=0" in out, out
    assert "batch shell got SIGUSR1" not in out, out
    assert "was not requeued" not in out, out
    assert slurm_cluster.job_info(job)["Restarts"] == "1"
    # Second run: same job id, SLURM_RESTART_COUNT=1, both ranks finish.
    assert "batch start restart_count=1" in out, out
    assert "rank 0 resumed" in out and "rank 1 resumed" in out, out
    assert out.rstrip().endswith("batch end rc=0"), out


REPO = Path(__file__).resolve().parents[1]

# Stands in for `python -m qlora_lit` (the job's cwd comes first on sys.path for `-m`): prints
# what it was started with, then behaves like Lightning's SLURM auto-requeue on SIGUSR1.
STUB_MAIN = """
import json, os, signal, subprocess, sys, time

rank = os.environ["SLURM_PROCID"]
restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
keys = ("SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_NNODES", "SLURM_CPUS_PER_TASK")
info = {"argv": sys.argv[1:], "restarts": restarts, "prefix": sys.prefix, **{k: os.environ.get(k) for k in keys}}
print(f"STUB rank {rank} " + json.dumps(info), flush=True)
if restarts != "0":
    sys.exit(0)

def on_usr1(signum, frame):
    print(f"STUB rank {rank} got SIGUSR1", flush=True)
    if rank == "0":
        subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=True)

signal.signal(signal.SIGUSR1, on_usr1)
print(f"STUB rank {rank} ready", flush=True)
time.sleep(120)
sys.exit(3)
"""


# The documented CPU override: --gres=none clears the scripts' `--gres=gpu:8`; two ranks, DDP over gloo.
CPU_SBATCH_ARGS = ("--gres=none", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=00:10:00")
CPU_OVERRIDES = ("--trainer.accelerator", "cpu", "--trainer.strategy", "ddp")


def _submit_on_cpu(slurm_cluster, tmp_path, script: str, config: str, *overrides: str, extra_sbatch=()) -> str:
    """slurm/<script> on `config` with the CPU overrides (then `overrides`) on the command line, from `tmp_path`."""
    return slurm_cluster.submit(
        REPO / "slurm" / script,
        config,
        *CPU_OVERRIDES,
        *overrides,
        sbatch_args=[*extra_sbatch, *CPU_SBATCH_ARGS],
        cwd=tmp_path,
    )


@pytest.mark.parametrize(
    "script, extra",
    [
        ("train.sbatch", []),
        ("train-multinode.sbatch", ["--nodes=1"]),  # one node is all the test cluster has
    ],
)
def test_train_sbatch_cpu_override_args_and_requeue(slurm_cluster, tmp_path, script, extra):
    (tmp_path / "qlora_lit").mkdir()
    (tmp_path / "qlora_lit" / "__init__.py").write_text("")
    (tmp_path / "qlora_lit" / "__main__.py").write_text(STUB_MAIN)
    (tmp_path / "cfg.yaml").write_text("trainer: {}\n")
    job = _submit_on_cpu(slurm_cluster, tmp_path, script, "cfg.yaml", "--trainer.max_steps", "5", extra_sbatch=extra)
    assert slurm_cluster.output_path(job) == tmp_path / f"slurm-{job}.out"
    slurm_cluster.wait_for_output(job, "STUB rank 0 ready", timeout=40)
    slurm_cluster.wait_for_output(job, "STUB rank 1 ready", timeout=10)
    slurm_cluster.cancel(job, "USR1")
    slurm_cluster.wait_for(job, "COMPLETED", timeout=50)
    out = slurm_cluster.read_output(job)

    runs = [
        json.loads(line.split(" ", 3)[3])
        for line in out.splitlines()
        if line.startswith("STUB rank ") and line.split()[3].startswith("{")
    ]
    assert len(runs) == 4, out  # 2 ranks x (first run + requeued run)
    for info in runs:
        assert info["argv"] == [
            "fit",
            "--config",
            "cfg.yaml",
            "--trainer.num_nodes",
            "1",
            "--trainer.devices",
            "2",
            "--trainer.logger.init_args.version",
            f"slurm-{job}",
            "--ckpt_path",
            "last",
            *CPU_OVERRIDES,
            "--trainer.max_steps",
            "5",
        ], out
        # What Lightning's SLURMEnvironment checks inside each rank.
        assert (info["SLURM_NTASKS"], info["SLURM_NTASKS_PER_NODE"], info["SLURM_NNODES"]) == ("2", "2", "1"), out
        assert info["SLURM_CPUS_PER_TASK"] == "1", out
        assert info["prefix"] == sys.prefix, out
    assert sorted(i["restarts"] for i in runs) == ["0", "0", "1", "1"], out
    assert "STUB rank 0 got SIGUSR1" in out and "STUB rank 1 got SIGUSR1" in out, out
    assert "restart 1:" in out, out  # the script's banner of the second run, appended to the log


def _submit_demo(slurm_cluster, tmp_path, *overrides: str) -> str:
    """slurm/train.sbatch with the demo config on CPU, no progress bar, then `overrides`."""
    demo = str(REPO / "configs" / "demo.yaml")
    no_bar = ("--trainer.enable_progress_bar", "false")
    return _submit_on_cpu(slurm_cluster, tmp_path, "train.sbatch", demo, *no_bar, *overrides)


def _last_checkpoint(tmp_path: Path, job: str) -> dict:
    import torch

    path = tmp_path / "runs" / "demo" / f"slurm-{job}" / "checkpoints" / "last.ckpt"
    return torch.load(path, weights_only=True)


def test_demo_trains_under_slurm_with_two_ranks(slurm_cluster, tmp_path):
    job = _submit_demo(slurm_cluster, tmp_path, "--trainer.max_steps", "6", "--trainer.val_check_interval", "3")
    slurm_cluster.wait_for(job, "COMPLETED", timeout=240)
    run = tmp_path / "runs" / "demo" / f"slurm-{job}"
    assert (run / "adapter" / "adapter_model.safetensors").is_file(), slurm_cluster.read_output(job)
    assert _last_checkpoint(tmp_path, job)["global_step"] == 6


def test_preempted_job_requeues_and_resumes_where_it_stopped(slurm_cluster, tmp_path):
    job = _submit_demo(slurm_cluster, tmp_path, "--trainer.max_steps", "60", "--trainer.val_check_interval", "12")
    # Signalled as soon as training runs (a fixed sleep let all the steps finish first on a fast machine).
    slurm_cluster.wait_for_output(job, "first optimizer step", timeout=180)
    slurm_cluster.cancel(job, "USR1")
    slurm_cluster.wait_for(job, "COMPLETED", timeout=300)
    out = slurm_cluster.read_output(job)
    saved = re.search(r"received SIGUSR1: stopped at step (\d+), saved", out)
    assert saved, out
    stopped_at = int(saved.group(1))
    assert 0 < stopped_at < 60, out
    assert "requeued Slurm job" in out and "restart 1:" in out, out
    assert re.search(r"resuming the data at epoch \d+ after \d+ batches", out), out
    assert _last_checkpoint(tmp_path, job)["global_step"] == 60  # no step lost or repeated in the total
    assert slurm_cluster.job_info(job)["Restarts"] == "1"
    versions = list((tmp_path / "runs" / "demo").iterdir())
    assert [v.name for v in versions] == [f"slurm-{job}"]  # both attempts logged into the same TensorBoard run


def _rank_pid(job: str, rank: int) -> int | None:
    """The pid of the qlora_lit process of `job` with SLURM_PROCID `rank` (srun's task), if it runs."""
    for entry in Path("/proc").iterdir():
        try:
            environ = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
            command = (entry / "cmdline").read_text()
        except (OSError, ValueError):
            continue
        if environ.get("SLURM_JOB_ID") == job and environ.get("SLURM_PROCID") == str(rank) and "qlora_lit" in command:
            return int(entry.name)
    return None


def test_a_killed_rank_requeues_the_job_which_resumes_from_the_last_checkpoint(slurm_cluster, tmp_path):
    job = _submit_demo(slurm_cluster, tmp_path, "--trainer.max_steps", "8", "--trainer.val_check_interval", "2")
    checkpoints = tmp_path / "runs" / "demo" / f"slurm-{job}" / "checkpoints"
    deadline = time.monotonic() + 180
    while not list(checkpoints.glob("step000002*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(_rank_pid(job, 1), signal.SIGKILL)  # the out-of-memory killer, say
    slurm_cluster.wait_for(job, "COMPLETED", timeout=300)
    out = slurm_cluster.read_output(job)
    assert "task 1: Killed" in out, out  # srun's word
    assert re.search(r"rank 1 \(pid \d+ on \S+\) ended without a word .*Rank 0 stops too", out), out
    assert "a rank was lost (srun exit status 137): requeueing job" in out and "restart 1:" in out, out
    assert slurm_cluster.job_info(job)["Restarts"] == "1"
    assert re.search(r"Restoring states from the checkpoint path at .*slurm-\d+/checkpoints/\S+\.ckpt", out), out
    assert _last_checkpoint(tmp_path, job)["global_step"] == 8

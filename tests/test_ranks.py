"""The line each rank prints before the ranks meet (qlora_lit/ranks.py), read from the trainer Lightning builds for
a launch: its own processes on one machine, or the tasks srun started (the variables it sets for
`--nodes 2 --ntasks-per-node 2`). tests/test_multinode.py sees the same lines from real ranks."""

from __future__ import annotations

import os

import lightning as L
import pytest

from qlora_lit.ranks import rank_layout


@pytest.fixture(autouse=True)
def _no_launch_variables(monkeypatch):
    """No Slurm job or rendezvous of the environment, and none left behind (Lightning writes MASTER_ADDR/PORT)."""
    for key in [key for key in os.environ if key.startswith("SLURM_")] + ["MASTER_ADDR", "MASTER_PORT"]:
        monkeypatch.setenv(key, "")  # recorded, so the teardown restores the original state
        monkeypatch.delenv(key)


def cpu_trainer(**settings) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, **settings)


def test_one_process_says_nothing():
    assert rank_layout(cpu_trainer(devices=1)) is None


def test_lightning_launch_on_one_machine(monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29517")
    line = rank_layout(cpu_trainer(devices=2, strategy="ddp"))
    assert line == "rank 0 of 2: node 0 of 1, local rank 0; rendezvous 127.0.0.1:29517 (LightningEnvironment)"


def test_srun_task_of_the_second_node(monkeypatch):
    srun = {
        "SLURM_JOB_ID": "734242",
        "SLURM_JOB_NAME": "qlora-lit",
        "SLURM_NTASKS": "4",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NODELIST": "gpu[07-08]",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
    }
    for key, value in srun.items():
        monkeypatch.setenv(key, value)
    line = rank_layout(cpu_trainer(devices=2, num_nodes=2, strategy="ddp"))
    # The first host of the allocation, and Lightning's port for the job: 15000 + the job id's last four digits.
    assert line == "rank 3 of 4: node 1 of 2, local rank 1; rendezvous gpu07:19242 (SLURMEnvironment)"

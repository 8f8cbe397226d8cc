"""Several nodes through slurm/train-multinode.sbatch, as far as one machine allows: a private Slurm cluster of two
nodes whose two slurmd run here (tests/slurm_cluster.py). srun starts two ranks on each; they find rank 0 where
Lightning's SLURMEnvironment looks (the first host of the job's node list, a port from the job id) and train the
demo over gloo like one node of four ranks."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEMO_CONFIG, checkpoint_at, fit_in_subprocess
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import two_node_slurm_cluster_fixture  # noqa: E402,F401  (the `two_node_slurm_cluster` fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
# Two steps of four ranks, a checkpoint (and the adapter) at steps 1 and 2; no samples (generation is slow here).
SHORT_FIT = ("--trainer.max_steps", "2", "--trainer.val_check_interval", "1", "--samples.prompts", "[]")
# What qlora_lit/ranks.py prints on every rank.
LAYOUT = re.compile(r"^rank (\d) of (\d): node (\d) of (\d), local rank (\d); rendezvous (\S+):(\d+) \((\w+)\)$", re.M)


def layouts(log: str) -> set[tuple]:
    return {(*map(int, m.groups()[:5]), m[6], int(m[7]), m[8]) for m in LAYOUT.finditer(log)}


def test_two_nodes_of_two_ranks_train_like_one_node_of_four(two_node_slurm_cluster, tmp_path):
    cluster = two_node_slurm_cluster
    submit_dir = tmp_path / "slurm"
    submit_dir.mkdir()
    job = cluster.submit(
        REPO / "slurm" / "train-multinode.sbatch",
        DEMO_CONFIG,
        *("--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.enable_progress_bar", "false"),
        *SHORT_FIT,
        sbatch_args=["--nodes=2", "--gres=none", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=00:10:00"],
        env={"OMP_NUM_THREADS": "1"},  # as fit_in_subprocess runs the single-node ranks: the same arithmetic
        cwd=submit_dir,
    )
    cluster.wait_for(job, "COMPLETED", timeout=400)
    log = cluster.read_output(job)
    assert f"2 node(s) x 2 task(s) on {cluster.nodename},{cluster.nodename}-node2;" in log, log
    # Ranks 0-1 on the first node, 2-3 on the second; all meet at the first node's address, on Lightning's port of
    # this job id (the last four digits + 15000).
    rendezvous = (cluster.nodename, 15000 + int(job[-4:]), "SLURMEnvironment")
    assert layouts(log) == {(rank, 4, rank // 2, 2, rank % 2, *rendezvous) for rank in range(4)}, log
    assert "`Trainer.fit` stopped: `max_steps=2` reached." in log, log
    two_nodes = submit_dir / "runs" / "demo" / f"slurm-{job}"

    one_node = fit_in_subprocess(
        tmp_path / "one_node", "--trainer.devices", "4", "--trainer.strategy", "ddp", *SHORT_FIT, timeout=400
    )
    one_node_log = (tmp_path / "one_node" / "log.txt").read_text()
    assert {layout[:5] for layout in layouts(one_node_log)} == {(rank, 4, 0, 1, rank) for rank in range(4)}

    # Rank r trains the same batches with the same seed in both layouts, and gloo sums four ranks' gradients in the
    # same order: the runs agree bit for bit.
    adapter = load_file(two_nodes / "adapter" / "adapter_model.safetensors")
    expected = load_file(one_node / "adapter" / "adapter_model.safetensors")
    assert adapter.keys() == expected.keys() and adapter
    for key, value in adapter.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    at_1, at_2 = (checkpoint_at(one_node, step)["state_dict"] for step in (1, 2))
    assert any(not torch.equal(value, at_1[key]) for key, value in at_2.items())  # the adapters compared trained
    assert checkpoint_at(two_nodes, 2)["global_step"] == 2

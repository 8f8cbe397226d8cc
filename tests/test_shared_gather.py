"""tests/shared_gather.py, the shared-GPU harness's all-gather, run on CPU processes sharing memory the same way."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from shared_gather import NAMES, SharedMemoryGather
from test_sharded_load import free_port


def gather_and_report(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.multiprocessing.set_sharing_strategy("file_system")  # CPU shared memory by name, as CUDA IPC by handle
    dist.init_process_group("gloo", rank=rank, world_size=2)
    grown = []
    gather = SharedMemoryGather(torch.device("cpu"), on_grow=grown.append)
    gather.install()
    gathered = []
    for numel, dtype in [(3, torch.float32), (5, torch.bfloat16), (9, torch.float32), (2, torch.bfloat16)]:
        shard = torch.arange(numel, dtype=dtype) + 100 * rank
        output = torch.empty(2 * numel, dtype=dtype)
        for name in NAMES:
            if hasattr(dist, name):
                output.zero_()
                getattr(dist, name)(output, shard)
                gathered.append(output.tolist())  # not tensors: they would travel by shared memory
    gather.uninstall()
    wrong = SharedMemoryGather(torch.device("cpu"), check=1)  # a gather that gets one byte wrong is caught
    wrong.gather = lambda output, shard: output.copy_(torch.cat([shard, shard]))  # its own shard twice
    wrong.install()
    try:
        dist.all_gather_into_tensor(torch.empty(4), torch.ones(2) * rank)
        caught = None
    except RuntimeError as error:
        caught = str(error)
    wrong.uninstall()
    results[rank] = {
        "caught": caught,
        "gathered": gathered,
        "grown": grown,
        "restored": all(getattr(dist, name) is original for name, original in gather.originals.items()),
    }
    dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_gather_each_others_shards_through_shared_memory():
    results = mp.Manager().dict()
    mp.spawn(gather_and_report, args=(free_port(), results), nprocs=2)
    expected = []
    for numel, dtype in [(3, torch.float32), (5, torch.bfloat16), (9, torch.float32), (2, torch.bfloat16)]:
        whole = torch.cat([torch.arange(numel, dtype=dtype) + 100 * rank for rank in (0, 1)])
        expected += [whole] * sum(hasattr(dist, name) for name in NAMES)
    for rank in (0, 1):
        report = results[rank]
        assert len(report["gathered"]) == len(expected)
        for got, want in zip(report["gathered"], expected, strict=True):
            assert got == want.tolist()
        assert report["grown"] == [12, 36]  # the buffer grows with the first larger shard only
        assert report["restored"]
        assert report["caught"] == "shared-memory all-gather differs from gloo's"

"""All-gathers between processes that share one GPU, through memory they share instead of gloo.

Ranks that share a GPU cannot use NCCL (it refuses two ranks on one device), and gloo copies every shard through
host memory and a TCP socket: about 0.35 GiB/s a rank, so one step of the 70B shape on two ranks (each gathering
the other's half of the 37 GiB base twice) takes minutes. Here each rank keeps one buffer that the other ranks map
(torch's CUDA IPC, as torch.multiprocessing shares CUDA tensors): a gather copies the rank's shard into its buffer,
waits for every rank to do the same (a gloo barrier), copies every buffer into the output, and waits again before
a buffer is written anew. Only the all-gathers FSDP shards the base with take this path (`all_gather_single`,
`all_gather_into_tensor` of tensors on the GPU); every other collective stays gloo's.

The buffer holds the largest shard gathered so far (it grows, collectively, with the first larger one). It is
memory NCCL would not need in this form (NCCL's own buffers are outside torch's allocator): `extra_bytes` says how
much, for whoever caps or reports a rank's memory. For the tests' harness only, not the product.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler

import torch
import torch.distributed as dist
import torch.multiprocessing  # noqa: F401 - registers torch's reductions (by handle, not by value) with ForkingPickler

NAMES = ("all_gather_single", "all_gather_into_tensor")  # torch 2.13 FSDP calls the first, earlier ones the second


class SharedMemoryGather:
    """Replaces torch.distributed's tensor all-gathers for tensors on `device` (all ranks must install it)."""

    def __init__(self, device: torch.device, on_grow: Callable[[int], None] | None = None, check: int = 2) -> None:
        self.device = device
        self.unchecked = check  # how many gathers are compared with gloo's
        self.on_grow = on_grow  # told the buffer's new size in bytes
        self.buffer: torch.Tensor | None = None
        self.peers: list[torch.Tensor] = []
        self.originals = {name: getattr(dist, name) for name in NAMES if hasattr(dist, name)}

    @property
    def extra_bytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel()

    def install(self) -> None:
        for name, original in self.originals.items():
            setattr(dist, name, self._wrapper(original))

    def uninstall(self) -> None:
        for name, original in self.originals.items():
            setattr(dist, name, original)
        self.buffer, self.peers = None, []

    def _wrapper(self, original: Callable) -> Callable:
        def all_gather(output_tensor, input_tensor, group=None, async_op=False):
            default = group is None or group is dist.group.WORLD or group is dist.distributed_c10d._get_default_group()
            if async_op or not default or input_tensor.device != self.device:
                return original(output_tensor, input_tensor, group=group, async_op=async_op)
            self.gather(output_tensor, input_tensor)
            if self.unchecked:  # the first gathers also through gloo: the same bytes, or a clear stop
                self.unchecked -= 1
                reference = torch.empty_like(output_tensor, device="cpu")  # on the CPU: no GPU memory for it
                original(reference, input_tensor.cpu(), group=group)
                if not torch.equal(reference.view(torch.uint8), output_tensor.cpu().view(torch.uint8)):
                    raise RuntimeError("shared-memory all-gather differs from gloo's")
            return None

        return all_gather

    def gather(self, output: torch.Tensor, shard: torch.Tensor) -> None:
        nbytes = shard.numel() * shard.element_size()
        if output.numel() != shard.numel() * dist.get_world_size():
            raise ValueError(f"all-gather: output of {output.numel()} elements for shards of {shard.numel()}")
        if nbytes > self.extra_bytes:
            self._grow(nbytes)
        self._as(self.buffer, shard).copy_(shard.reshape(-1))
        self._synchronize()
        dist.barrier()  # every rank's shard is in its buffer
        flat = output.view(-1)
        for rank, peer in enumerate(self.peers):
            flat[rank * shard.numel() : (rank + 1) * shard.numel()].copy_(self._as(peer, shard))
        self._synchronize()
        dist.barrier()  # every rank has read every buffer: they may be written again

    def _grow(self, nbytes: int) -> None:
        """A larger buffer on every rank (all ranks reach this in the same call: they gather the same sizes)."""
        self.peers = []
        self.buffer = None
        if self.on_grow is not None:  # first: a rank capped at its size would not have room for the buffer
            self.on_grow(nbytes)
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        shared = [None] * dist.get_world_size()
        dist.all_gather_object(shared, bytes(ForkingPickler.dumps(self.buffer)))
        rank = dist.get_rank()
        self.peers = [self.buffer if r == rank else pickle.loads(handle) for r, handle in enumerate(shared)]

    @staticmethod
    def _as(buffer: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return buffer[: like.numel() * like.element_size()].view(like.dtype)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

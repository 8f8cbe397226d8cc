"""Which examples go into which batch, on which rank, in which order — reproducibly and resumably."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist


class EpochBatchSampler(torch.utils.data.Sampler[list]):
    """Shuffled batches of indices, the same on every run with the same seed, split evenly across ranks.

    The order of epoch `e` depends only on `(seed, e)`. With `progress`, the data is one stream of epochs and each
    pass over it starts where training stands: after `n` batches of the run, at epoch `n // len(self)`, after its
    first `n % len(self)` batches. So a resumed run continues mid-epoch, and a finished run extended with a larger
    max_steps continues where it stopped, whatever the trainer calls its epochs.

    With `group_by_length`, indices are sorted by length within windows of `group_window` batches, so each batch
    holds examples of similar length (less padding) while the batch order stays random. Every rank gets the same
    number of batches: the last few batches that do not divide evenly are dropped, counted in `dropped_batches`.

    With `label_counts`, each index comes as `(index, step_label_tokens)`: the number of label tokens in the whole
    optimizer step it belongs to, over all ranks and all `accumulate` micro-batches. Every rank knows every batch,
    so the loss can be normalised per label token of the step with no communication (see QLoRAModule).

    Args:
        lengths: token count of each example.
        batch_size: examples per batch on each rank.
        seed: base seed of the shuffling.
        shuffle: shuffle per epoch; False keeps the dataset order (validation).
        group_by_length: batch examples of similar length together.
        group_window: batches per length-sorting window.
        label_counts: label tokens of each example; switches on the `(index, step_label_tokens)` items.
        accumulate: micro-batches per optimizer step on each rank (the trainer's `accumulate_grad_batches`).
        progress: asked at the start of each pass: the batches this rank has trained in the run (over every epoch and
            resume) and in the trainer's current epoch; a pass yields no more batches than that epoch has left.
            Without it, each pass is the whole epoch `set_epoch` names.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        group_by_length: bool = False,
        group_window: int = 64,
        label_counts: Sequence[int] | None = None,
        accumulate: int = 1,
        progress: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        self.lengths = torch.as_tensor(list(lengths))
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.group_window = group_window
        self.label_counts = None if label_counts is None else torch.as_tensor(list(label_counts))
        self.accumulate = accumulate
        self.progress = progress
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def position(self, batches: int) -> tuple[int, int]:
        """(epoch, batches of it done) after `batches` batches of the run on this rank."""
        return divmod(batches, max(len(self), 1))

    @property
    def sampler(self) -> EpochBatchSampler:
        """Lightning calls `set_epoch` on `dataloader.batch_sampler.sampler` (not on the batch sampler itself)."""
        return self

    @staticmethod
    def world() -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def all_batches(self) -> list[list[int]]:
        """This epoch's batches for all ranks together, before the split."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        count = len(self.lengths)
        order = torch.randperm(count, generator=generator) if self.shuffle else torch.arange(count)
        if self.group_by_length:
            window = self.batch_size * self.group_window
            chunks = [order[i : i + window] for i in range(0, len(order), window)]
            order = torch.cat([chunk[self.lengths[chunk].argsort(descending=True, stable=True)] for chunk in chunks])
        batches = [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        if self.group_by_length and self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def rank_batches(self) -> list[list]:
        return self.batches_of(*self.world())

    def batches_of(self, rank: int, world_size: int) -> list[list]:
        """This epoch's batches of rank `rank` among `world_size` ranks (bench/rank_balance.py asks for each)."""
        batches = self.all_batches()
        batches = batches[: len(batches) // world_size * world_size]
        if self.label_counts is not None:
            batches = self.with_step_label_tokens(batches, world_size)
        return batches[rank::world_size]

    def with_step_label_tokens(self, batches: list[list[int]], world_size: int) -> list[list[tuple[int, int]]]:
        """Rank r's k-th batch is global batch k * world_size + r, so optimizer step s spans a contiguous slice."""
        span = self.accumulate * world_size
        tagged = []
        for start in range(0, len(batches), span):
            step = batches[start : start + span]
            tokens = int(sum(self.label_counts[batch].sum() for batch in step))
            tagged += [[(index, tokens) for index in batch] for batch in step]
        return tagged

    @property
    def dropped_batches(self) -> int:
        return batch_count(len(self.lengths), self.batch_size) % self.world()[1]

    def __iter__(self) -> Iterator[list]:
        if self.progress is None:
            yield from self.rank_batches()
            return
        in_run, in_epoch = self.progress()
        self.epoch, skip = self.position(in_run)
        yield from self.rank_batches()[skip : skip + len(self) - in_epoch]

    def __len__(self) -> int:
        rank, world_size = self.world()
        return batch_count(len(self.lengths), self.batch_size) // world_size


def batch_count(items: int, batch_size: int) -> int:
    """Batches of at most `batch_size` that `items` make (the last one may be short)."""
    return -(-items // batch_size)

from unittest import mock

import torch
from lightning.fabric.utilities.data import _set_sampler_epoch

from qlora_lit.data.sampler import EpochBatchSampler

LENGTHS = [(i * 37) % 101 + 1 for i in range(50)]


def flat(batches):
    return [i for batch in batches for i in batch]


def test_same_seed_same_order_and_each_epoch_differs():
    a, b = EpochBatchSampler(LENGTHS, 4, seed=1), EpochBatchSampler(LENGTHS, 4, seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert sorted(flat(list(a))) == list(range(50))  # every example once per epoch
    assert len(a) == len(first) == 13


def test_lightning_advances_the_epoch():
    sampler = EpochBatchSampler(LENGTHS, 4)
    loader = torch.utils.data.DataLoader(range(50), batch_sampler=sampler)
    _set_sampler_epoch(loader, 3)
    assert sampler.epoch == 3


def test_each_pass_starts_where_training_stands_and_ends_with_the_trainers_epoch():
    progress = {"run": 5, "epoch": 5}
    sampler = EpochBatchSampler(LENGTHS, 4, seed=2, progress=lambda: (progress["run"], progress["epoch"]))
    epochs = [list(EpochBatchSampler(LENGTHS, 4, seed=2, progress=lambda e=e: (13 * e, 0))) for e in range(3)]
    assert epochs[0] != epochs[1] != epochs[2] and all(len(epoch) == 13 for epoch in epochs)
    assert list(sampler) == epochs[0][5:]  # resumed mid-epoch
    progress.update(run=13 + 2, epoch=2)  # max_steps ended epoch 1 after 2 batches; the trainer counts it complete
    assert list(sampler) == epochs[1][2:] and sampler.epoch == 1
    progress.update(run=2 * 13, epoch=13)  # resumed inside an epoch the trainer has used up: nothing left of it
    assert list(sampler) == [] and sampler.epoch == 2
    progress.update(epoch=0)
    assert list(sampler) == epochs[2]


def test_ranks_split_the_batches_evenly_and_disjointly():
    batches = {}
    for rank in (0, 1):
        with mock.patch.object(EpochBatchSampler, "world", return_value=(rank, 2)):
            sampler = EpochBatchSampler(LENGTHS, 4, seed=3)
            batches[rank] = list(sampler)
            assert len(batches[rank]) == len(sampler) == 6
            assert sampler.dropped_batches == 1  # 13 batches: one cannot be split evenly
    assert not set(flat(batches[0])) & set(flat(batches[1]))


def test_group_by_length_reduces_padding_with_the_same_examples():
    def padding(batches):
        return sum(max(LENGTHS[i] for i in b) * len(b) - sum(LENGTHS[i] for i in b) for b in batches)

    plain = list(EpochBatchSampler(LENGTHS, 4, seed=4))
    grouped = list(EpochBatchSampler(LENGTHS, 4, seed=4, group_by_length=True, group_window=4))
    assert sorted(flat(grouped)) == sorted(flat(plain))
    assert padding(grouped) < padding(plain) / 2
    assert grouped == list(EpochBatchSampler(LENGTHS, 4, seed=4, group_by_length=True, group_window=4))


def test_grouped_batches_split_across_ranks_deterministically():
    def rank_batches(rank: int) -> list:
        with mock.patch.object(EpochBatchSampler, "world", return_value=(rank, 2)):
            return list(EpochBatchSampler(LENGTHS, 4, seed=5, group_by_length=True, group_window=4))

    first, second = rank_batches(0), rank_batches(1)
    assert first == rank_batches(0) and second == rank_batches(1)  # same seed, same batches on every run
    assert not set(flat(first)) & set(flat(second))
    for batch in first + second:  # similar lengths within each batch: sorted within windows of 4 batches
        assert max(LENGTHS[i] for i in batch) - min(LENGTHS[i] for i in batch) <= 40

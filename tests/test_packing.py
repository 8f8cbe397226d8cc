"""Packing: rows of several examples in which no example sees another, training the same objective as unpacked."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from conftest import SAMPLE_DATA, TINY_MODEL, examples_run_alone
from lightning.pytorch.loops.progress import _BatchProgress
from test_loss_normalisation import first_step_gradients

from qlora_lit.assets import resolve_asset
from qlora_lit.data import KoAlpacaDataModule
from qlora_lit.data.collate import IGNORE_INDEX, label_count
from qlora_lit.data.packing import PackedDataset, PackingCollator, pack_rows
from qlora_lit.data.sampler import EpochBatchSampler
from qlora_lit.model import LoraArgs, QuantizationArgs
from qlora_lit.module import QLoRAModule

EXAMPLES = [
    {"input_ids": [5, 10, 11, 12, 20, 21, 2], "trained_spans": [(4, 7)]},
    {"input_ids": [5, 13, 22, 2], "trained_spans": [(2, 4)]},
    {"input_ids": [5, 14, 15, 23, 24, 2], "trained_spans": [(3, 6)]},
]


def test_rows_never_overflow_hold_every_example_once_and_are_deterministic():
    lengths = [(i * 37) % 101 + 1 for i in range(200)]
    rows = pack_rows(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(200))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert len(rows) <= sum(lengths) / 128 * 1.1  # nearly full rows
    assert pack_rows(lengths, 128) == rows


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_packed_rows_restart_positions_and_never_predict_across_examples(train_on_prompt):
    rows = PackedDataset(EXAMPLES, [[0, 1], [2]], train_on_prompt)
    batch = PackingCollator(pad_id=2)([rows[0], rows[1]])
    assert "attention_mask" not in batch  # it would switch transformers' packed masks off
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 0, 1, 2, 3, 4], [*range(6), *range(10)]]
    labels = batch["labels"][0].tolist()
    assert labels[0] == labels[7] == IGNORE_INDEX  # each example's first token: no prediction from the one before
    if train_on_prompt:
        assert labels[:11] == [IGNORE_INDEX, 10, 11, 12, 20, 21, 2, IGNORE_INDEX, 13, 22, 2]
    else:
        assert labels[:11] == [IGNORE_INDEX] * 4 + [20, 21, 2] + [IGNORE_INDEX] * 2 + [22, 2]
    assert labels[11:] == [IGNORE_INDEX] * 5  # padding
    assert rows.label_counts() == [
        label_count(EXAMPLES[0], train_on_prompt) + label_count(EXAMPLES[1], train_on_prompt),
        label_count(EXAMPLES[2], train_on_prompt),
    ]
    assert (batch["labels"][:, 1:] != IGNORE_INDEX).sum() == sum(rows.label_counts())  # what the loss counts


@pytest.fixture(scope="module")
def sample_examples():
    data = KoAlpacaDataModule(SAMPLE_DATA, TINY_MODEL, max_length=64, val_size=8)
    data.setup()
    return data.train_set[:5]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager", "varlen"])
def test_logits_of_a_packed_row_equal_those_of_the_examples_run_separately(sample_examples, attn_implementation):
    module = QLoRAModule(
        TINY_MODEL,
        quantization=QuantizationArgs(compute_dtype="float32"),
        lora=LoraArgs(r=4, dropout=0.0),
        attn_implementation=attn_implementation,
    )
    module.configure_model()
    module.eval()
    for lora_b in (p for name, p in module.named_parameters() if "lora_B" in name):
        torch.nn.init.normal_(lora_b, std=0.05)  # B starts at zero: make the adapters count
    rows = PackedDataset(sample_examples, [[0, 1, 2], [3, 4]])
    batch = PackingCollator(pad_id=1)([rows[0], rows[1]])
    with torch.no_grad():
        packed = module(**batch).logits
        contaminated = module(batch["input_ids"], attention_mask=torch.ones_like(batch["input_ids"])).logits
        for row, start, end, alone in examples_run_alone(module, sample_examples, rows.rows):
            torch.testing.assert_close(packed[row, start:end], alone, rtol=1e-4, atol=1e-4)
            if start > 0:  # the test can see contamination: without the packed mask the logits differ
                assert not torch.allclose(contaminated[row, start:end], alone, rtol=1e-2, atol=1e-2)


def test_packed_and_unpacked_training_take_the_same_first_step(tmp_path):
    """The 12 training examples in one optimizer step either way: one padded batch, or packed rows accumulated over
    several micro-batches. Loss per real label token of the step: the gradients must agree."""
    small = tmp_path / "small.jsonl"
    lines = Path(resolve_asset(SAMPLE_DATA)).read_text(encoding="utf-8").splitlines(keepends=True)
    small.write_text("".join(lines[:14]), encoding="utf-8")
    settings = {"path": str(small), "max_length": 128, "val_size": 2}
    packed_data = KoAlpacaDataModule(**settings, pack_length=256)
    packed_data.setup()
    examples, rows = len(packed_data.train_set), len(packed_data.packed_rows)
    assert examples == 12 and 2 < rows < examples
    unpacked = first_step_gradients(batch_size=examples, accumulate=1, **settings)
    packed = first_step_gradients(batch_size=2, accumulate=-(-rows // 2), **settings, pack_length=256)
    assert unpacked.keys() == packed.keys()
    for name in unpacked:
        torch.testing.assert_close(packed[name], unpacked[name], rtol=1e-4, atol=1e-7, msg=name)


def test_packed_rows_split_across_ranks_count_step_tokens_and_resume_mid_epoch():
    data = KoAlpacaDataModule(SAMPLE_DATA, TINY_MODEL, max_length=64, batch_size=2, val_size=8, pack_length=256)
    data.setup()
    progress = _BatchProgress()
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress))
    data.trainer = SimpleNamespace(fit_loop=loop, accumulate_grad_batches=2)
    rows, batches = {}, {}
    for rank in (0, 1):
        with mock.patch.object(EpochBatchSampler, "world", return_value=(rank, 2)):
            progress.total.processed = progress.current.ready = 0
            loader = data.train_dataloader()
            rows[rank] = {index for batch in loader.batch_sampler for index, _ in batch}
            batches[rank] = list(loader)
            progress.total.processed = progress.current.ready = 3  # what Lightning restores
            resumed = list(data.train_dataloader())
        assert len(resumed) == len(batches[rank]) - 3 > 0
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(resumed, batches[rank][3:], strict=True))
    assert not rows[0] & rows[1]
    assert len(rows[0] | rows[1]) >= len(data.packed_rows) - 3  # at most one uneven batch of 2 rows is left out
    # every micro-batch knows the label tokens of its whole optimizer step: 2 ranks x 2 accumulated micro-batches
    for step in range(len(batches[0]) // 2):
        micro = [batches[rank][2 * step + k] for rank in (0, 1) for k in (0, 1)]
        tokens = sum(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) for batch in micro)
        assert all(int(batch["step_label_tokens"]) == tokens for batch in micro)


def test_flash_attention_gets_the_packed_batch_as_one_flat_row_with_the_same_loss(sample_examples):
    """flash-attention finds sequence starts in position ids only for a single row; flattening must not change the
    loss (the flat row is run through sdpa here: no flash-attn on a CPU)."""
    module = QLoRAModule(TINY_MODEL, quantization=QuantizationArgs(compute_dtype="float32"), lora=LoraArgs(dropout=0))
    module.configure_model()
    batch = PackingCollator(pad_id=1)(list(PackedDataset(sample_examples, [[0, 1, 2], [3, 4]])))
    with torch.no_grad():
        rows = module(**batch)
        module.attn_implementation = "flash_attention_2"
        flat = module(**batch)
    assert rows.logits.shape[0] == 2 and flat.logits.shape[0] == 1
    torch.testing.assert_close(flat.loss, rows.loss)
    torch.testing.assert_close(flat.logits.reshape(rows.logits.shape), rows.logits, rtol=1e-4, atol=1e-4)

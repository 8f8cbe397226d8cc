"""TrainingMonitor counts exactly what the batches hold, per optimizer step, and times training only."""

from __future__ import annotations

import time
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import SAMPLE_DATA, TINY_MODEL, NoHostWaits
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger

from qlora_lit.data import KoAlpacaDataModule
from qlora_lit.flops import LoraFlops
from qlora_lit.model import LoraArgs, QuantizationArgs
from qlora_lit.module import QLoRAModule
from qlora_lit.monitor import TrainingMonitor
from qlora_lit.optim import OptimizerArgs

BATCH, ACCUMULATE, LOG_EVERY, VALIDATION_SLEEP = 4, 2, 2, 1.5


class MemoryLogger(Logger):
    """Keeps what Lightning logs: {step: {name: value}}."""

    name, version = "memory", 0

    def __init__(self) -> None:
        super().__init__()
        self.logged: dict[int, dict[str, float]] = {}

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logged.setdefault(step, {}).update(metrics)


class BatchRecorder(Callback):
    """Counts every training batch independently of the monitor; makes each validation slow."""

    def __init__(self) -> None:
        self.batches: list[dict[str, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        self.batches.append(
            {
                "tokens": sum(lengths),
                "labels": int((batch["labels"][:, 1:] != -100).sum()),
                "pairs": sum(length * (length + 1) // 2 for length in lengths),
                "slots": batch["input_ids"].numel(),
            }
        )

    def on_validation_start(self, trainer, pl_module):
        time.sleep(VALIDATION_SLEEP)


@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory):
    L.seed_everything(1)
    module = QLoRAModule(
        TINY_MODEL,
        quantization=QuantizationArgs(compute_dtype="float32"),
        lora=LoraArgs(r=4, alpha=8),
        optimizer=OptimizerArgs(name="adamw", lr=1e-3),
    )
    data = KoAlpacaDataModule(SAMPLE_DATA, TINY_MODEL, max_length=96, batch_size=BATCH, val_size=8)
    logger, recorder = MemoryLogger(), BatchRecorder()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        accumulate_grad_batches=ACCUMULATE,
        log_every_n_steps=LOG_EVERY,
        gradient_clip_val=1e-3,
        val_check_interval=4,  # batches: one validation, after optimizer step 2
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=logger,
        default_root_dir=tmp_path_factory.mktemp("monitored"),
        enable_checkpointing=False,
        callbacks=[TrainingMonitor(peak_tflops=1.0), recorder],
        use_distributed_sampler=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    started = time.perf_counter()
    trainer.fit(module, data)
    wall_clock = time.perf_counter() - started
    windows = [metrics for _, metrics in sorted(logger.logged.items()) if "throughput/tokens_per_s" in metrics]
    return module, recorder.batches, windows, wall_clock


def test_logs_once_per_log_every_n_steps(monitored_run):
    _, _, windows, _ = monitored_run
    assert len(windows) == 4 // LOG_EVERY
    for metrics in windows:
        assert metrics["epoch"] == 0
        assert not any(name.startswith("memory/") for name in metrics)  # CUDA only


def test_counts_are_exact(monitored_run):
    module, batches, windows, _ = monitored_run
    per_window = ACCUMULATE * LOG_EVERY
    flops = LoraFlops.of(module.model)
    for index, metrics in enumerate(windows):
        window = batches[index * per_window : (index + 1) * per_window]
        total = {key: sum(batch[key] for batch in window) for key in window[0]}
        seconds = metrics["throughput/step_time_s"] * LOG_EVERY
        assert metrics["throughput/samples_per_s"] * seconds == pytest.approx(BATCH * per_window)
        assert metrics["throughput/tokens_per_s"] * seconds == pytest.approx(total["tokens"])
        assert metrics["throughput/label_tokens_per_s"] * seconds == pytest.approx(total["labels"])
        assert metrics["train/padding_fraction"] == pytest.approx(1 - total["tokens"] / total["slots"])
        assert metrics["throughput/mfu"] * 1e12 * seconds == pytest.approx(flops.total(total["tokens"], total["pairs"]))


def test_gradient_norm_is_taken_before_clipping(monitored_run):
    _, _, windows, _ = monitored_run
    assert all(metrics["train/grad_norm"] > 1e-2 for metrics in windows)  # clipped to 1e-3 afterwards


def test_validation_time_is_not_training_time(monitored_run):
    _, _, windows, wall_clock = monitored_run
    timed = sum(metrics["throughput/step_time_s"] * LOG_EVERY for metrics in windows)
    assert timed < wall_clock - VALIDATION_SLEEP


# Two packed rows: examples of 4 and 3 tokens, then one of 3 (the collator pads the second row).
PACKED_ROWS = [
    {
        "input_ids": [1, 2, 3, 4, 5, 6, 7],
        "labels": [-100, -100, 3, 4, -100, 6, 7],
        "position_ids": [0, 1, 2, 3, 0, 1, 2],
    },
    {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "position_ids": [0, 1, 2]},
]


def test_example_lengths_of_packed_rows_leave_out_the_padding_segment():
    from qlora_lit.data.packing import PackingCollator
    from qlora_lit.monitor import example_lengths

    lengths = example_lengths(PackingCollator(pad_id=0)(PACKED_ROWS))
    assert sorted(length for length in lengths.tolist() if length) == [3, 3, 4]  # zeros hold the other slots


def test_example_lengths_never_make_a_gpu_host_wait():
    """The monitor counts tokens before every micro-batch: an operation whose output size depends on the data
    would make the host wait for the GPU each time."""
    from qlora_lit.data.packing import PackingCollator
    from qlora_lit.monitor import example_lengths

    rows = [{"input_ids": [1, 2, 3, 4], "labels": [-100, 2, -100, 4], "position_ids": [0, 1, 0, 1]}]
    batch = PackingCollator(pad_id=0)(rows * 2)
    with NoHostWaits():
        lengths = example_lengths(batch)
    assert lengths.sum() == 8 and (lengths * (lengths + 1) // 2).sum() == 12


def test_samples_are_examples_also_in_packed_rows():
    """`throughput/samples_per_s` counted packed rows (4 a step where 13-15 examples were trained on the demo)."""
    from qlora_lit.data.packing import PackingCollator

    monitor = TrainingMonitor()
    monitor._start_window(torch.device("cpu"))
    monitor.on_train_batch_start(
        None, SimpleNamespace(device=torch.device("cpu")), PackingCollator(pad_id=0)(PACKED_ROWS), 0
    )
    tokens, labels, pairs, examples = monitor._counts.tolist()
    assert (tokens, examples) == (10, 3)

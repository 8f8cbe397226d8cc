"""A fit reads values from the device only where it writes logs (and once per step for `nonfinite_loss: stop`), and
the progress bar still shows each optimizer step's loss (qlora_lit/progress.py)."""

from __future__ import annotations

import traceback

import lightning as L
import pytest
import torch
from conftest import SAMPLE_DATA, TINY_MODEL
from torch.utils._python_dispatch import TorchDispatchMode

from qlora_lit.data import KoAlpacaDataModule
from qlora_lit.model import LoraArgs, QuantizationArgs
from qlora_lit.module import QLoRAModule
from qlora_lit.monitor import TrainingMonitor
from qlora_lit.progress import HostCopy, LoggedMetricsBar

STEPS, ACCUMULATE, LOG_EVERY = 6, 2, 3


class ValueReads(TorchDispatchMode):
    """Each read of a tensor's value (what waits for a GPU): the optimizer step it happened in and its callers
    outside torch, innermost first."""

    def __init__(self, trainer: L.Trainer) -> None:
        super().__init__()
        self.trainer, self.reads = trainer, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            frames = [f for f in reversed(traceback.extract_stack()[:-1]) if "/torch/" not in f.filename]
            self.reads.append((self.trainer.global_step, [f"{f.filename}:{f.name}" for f in frames[:6]]))
        return func(*args, **(kwargs or {}))


class RecordReads(L.Callback):
    """ValueReads over the whole of training; also what the bar showed after each micro-batch and every step's
    train_loss as the module logged it."""

    def __init__(self, bar: LoggedMetricsBar) -> None:
        self.bar, self.shown, self.step_losses = bar, [], {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.mode = ValueReads(trainer)
        self.mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.mode.__exit__(None, None, None)  # the test's own reads are not the fit's
        if trainer.global_step not in self.step_losses and "train_loss" in trainer.callback_metrics:
            self.step_losses[trainer.global_step] = trainer.callback_metrics["train_loss"].item()
        self.shown.append(self.bar.get_metrics(trainer, pl_module).get("train_loss"))
        self.mode.__enter__()

    def on_train_end(self, trainer, pl_module) -> None:
        self.mode.__exit__(None, None, None)


@pytest.fixture(scope="module")
def recorded_fit(tmp_path_factory):
    L.seed_everything(3)
    module = QLoRAModule(TINY_MODEL, quantization=QuantizationArgs(compute_dtype="float32"), lora=LoraArgs(r=4))
    data = KoAlpacaDataModule(SAMPLE_DATA, TINY_MODEL, max_length=96, batch_size=4, val_size=8)
    bar = LoggedMetricsBar()
    recorder = RecordReads(bar)
    root = tmp_path_factory.mktemp("progress")
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        accumulate_grad_batches=ACCUMULATE,
        log_every_n_steps=LOG_EVERY,
        limit_val_batches=0,
        default_root_dir=root,
        logger=L.pytorch.loggers.TensorBoardLogger(root, name="run"),
        callbacks=[TrainingMonitor(), recorder, bar],
        use_distributed_sampler=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, data)
    return recorder


def test_a_fit_reads_device_values_only_where_it_writes_logs(recorded_fit):
    """Lightning reads every `prog_bar=True` metric after every micro-batch, bar or not (its result collection): the
    fit logs none in training, so outside the log steps the only read by qlora_lit's or Lightning's code is
    `nonfinite_loss: stop`'s, once per step. (Reads of host tensors while batches are made, and transformers' own
    in the padded sdpa path this CPU fit takes, are not the fit's.)"""
    reads = [
        (step, callers)
        for step, callers in recorded_fit.mode.reads
        if ("/qlora_lit/" in callers[0] and "/qlora_lit/data/" not in callers[0]) or "/lightning/" in callers[0]
    ]
    assert not [callers for _, callers in reads if any("logger_connector/result.py" in c for c in callers)]
    stop_checks = [step for step, callers in reads if "module.py:stop_if_nonfinite" in callers[0]]
    assert stop_checks == list(range(STEPS))  # in each step's on_before_optimizer_step, before the update
    others = [(step, callers[0]) for step, callers in reads if "module.py:stop_if_nonfinite" not in callers[0]]
    assert others and all(step % LOG_EVERY == 0 for step, _ in others), others  # the logs written, steps 3 and 6
    assert {step for step, _ in others} == {3, 6}


def test_the_bar_shows_each_steps_loss_at_most_one_step_late(recorded_fit):
    shown = [value for value in recorded_fit.shown if value is not None]
    losses = recorded_fit.step_losses
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert shown and all(any(value == pytest.approx(loss) for loss in losses.values()) for value in shown)
    # each step's loss appears by the end of the step after it
    assert {loss for step, loss in losses.items() if step < STEPS} <= set(shown)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_host_copy_arrives_without_a_wait_on_a_gpu():
    big = torch.randn(4096, 4096, device="cuda")
    loss = (big @ big).mean()  # queued work the copy comes after
    copy = HostCopy({"train_loss": loss, "throughput/tokens_per_s": torch.tensor(5.0, device="cuda")})
    assert copy.host.is_pinned()
    torch.cuda.synchronize()
    assert copy.ready()
    assert copy.values() == {"train_loss": pytest.approx(loss.item()), "throughput/tokens_per_s": 5.0}

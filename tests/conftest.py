"""Shared fixtures: everything offline, on the CPU, with the tiny model and sample data the package ships."""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import pytest
from runs import DEMO_CONFIG, checkpoint_at, fit_in_subprocess  # noqa: F401 (the tests import them from here)
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_MODEL = "builtin:tiny-llama"
SAMPLE_DATA = "builtin:koalpaca_sample.jsonl"
# A short demo fit with a validation, and so a checkpoint and an adapter export, at steps 2, 4 and 6.
SHORT_FIT = ["fit", "--config", DEMO_CONFIG, "--trainer.max_steps", "6", "--trainer.val_check_interval", "2"]
SHORT_FIT += ["--trainer.enable_progress_bar", "false", "--samples.prompts", "[]"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own data cache, never the user's ~/.cache."""
    monkeypatch.setenv("QLORA_LIT_CACHE", str(tmp_path_factory.getbasetemp() / "qlora_lit_cache"))


@pytest.fixture(autouse=True)
def _rank_zero_restored(monkeypatch):
    """A Trainer built for another rank (a Slurm task's variables) sets Lightning's process-wide rank; later tests
    of this process would then log nothing and find TensorBoard's writer replaced by a stand-in."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)


@pytest.fixture(scope="session")
def tokenizer():
    from qlora_lit.data.datamodule import load_tokenizer

    return load_tokenizer(TINY_MODEL)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A 4-step demo fit through the CLI: its run folder (adapter/, checkpoints/, config.yaml), the trained module."""
    from qlora_lit.cli import cli_main

    root = tmp_path_factory.mktemp("trained_run")
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    overrides = {
        "trainer.max_steps": "4",
        "trainer.val_check_interval": "2",
        "trainer.enable_progress_bar": "false",
        "trainer.logger.init_args.save_dir": str(root),
        "data.cache_dir": str(root / "cache"),  # session fixtures run before the per-test cache isolation
    }
    args = [item for key, value in overrides.items() for item in (f"--{key}", value)]
    cli = cli_main(["fit", "--config", str(demo), *args])
    cli.model.eval()
    return Path(cli.trainer.log_dir), cli.model


def cpu_trainer(root: Path, max_steps: int, callbacks: list, **trainer_args):
    """A quiet CPU Trainer validating every 2 optimizer steps (not per epoch), logging to TensorBoard in root/run."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        default_root_dir=root,
        logger=TensorBoardLogger(root, name="run"),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_args,
    )


def shown_by_tensorboard(markdown: str) -> str:
    """The text TensorBoard's TEXT tab displays for a markdown string (its own renderer, then tags stripped)."""
    import html
    import re

    from tensorboard.plugin_util import markdown_to_safe_html

    return html.unescape(re.sub(r"<[^>]+>", "", markdown_to_safe_html(markdown)))


class NoHostWaits(TorchDispatchMode):
    """Fails on any operation that, on a GPU, makes the host wait for the device: reading a value (.item(), int(),
    bool()) or an output whose size depends on the data (nonzero, bincount, boolean indexing). For code that runs
    every micro-batch. `ops` counts what was dispatched at all."""

    WAITS = {"aten._local_scalar_dense", "aten.nonzero", "aten.bincount", "aten.masked_select", "aten.index"}

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        assert str(func.overloadpacket) not in self.WAITS, f"{func} would make the host wait for the GPU"
        self.ops += 1
        return func(*args, **(kwargs or {}))


class HostWaitsIn(NoHostWaits):
    """Records, rather than fails on, the operations NoHostWaits refuses that are called from code under `folder`
    (the nearest caller outside torch and this file): "which waits are ours" over code that also runs others'."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder, self.waits = str(folder), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in self.WAITS:
            outside = (f for f in reversed(traceback.extract_stack()) if not _in_torch_or_here(f.filename))
            caller = next(outside, None)
            if caller is not None and caller.filename.startswith(self.folder):
                self.waits.append(f"{func} at {caller.filename}:{caller.lineno}")
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _in_torch_or_here(filename: str) -> bool:
    return filename == __file__ or f"{os.sep}torch{os.sep}" in filename


def plain_peft(adapter: Path, quantization=None, base_model: str = TINY_MODEL):
    """The adapter on its base in plain transformers + PEFT, in eval mode, as a user loads it (4-bit when
    `quantization` is given). bitsandbytes' CPU inference layout stays off, as qlora_lit keeps it: on a CPU with
    AVX512-BF16 an eval forward would otherwise compute through bf16 scales, logits about 0.1 away from what training
    computed, which is a property of that CPU's kernel, not of the adapter."""
    import bitsandbytes as bnb
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_lit.assets import resolve_asset

    bnb_config = {"quantization_config": quantization.to_bnb_config()} if quantization else {}
    base = AutoModelForCausalLM.from_pretrained(
        resolve_asset(base_model), dtype=torch.float32, device_map="cpu", **bnb_config
    )
    for layer in base.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.support_avx512bf16_for_cpu = False
    return PeftModel.from_pretrained(base, adapter).eval()


def examples_run_alone(module, examples: list[dict], rows: list[list[int]]):
    """For each example of packed `rows` (indices into `examples`): its row, start, end in that row, and the logits
    of the example run on its own, for comparison with its span of the packed logits."""
    import torch

    for row, indices in enumerate(rows):
        start = 0
        for index in indices:
            ids = torch.tensor([examples[index]["input_ids"]])
            alone = module(ids, attention_mask=torch.ones_like(ids)).logits[0]
            yield row, start, start + ids.shape[1], alone
            start += ids.shape[1]

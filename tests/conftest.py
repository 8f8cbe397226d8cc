"""Shared fixtures: everything offline, on the CPU, with the tiny model and sample data the package ships."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_MODEL = "builtin:tiny-llama"
SAMPLE_DATA = "builtin:koalpaca_sample.jsonl"
DEMO_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
# A short demo fit with a validation, and so a checkpoint and an adapter export, at steps 2, 4 and 6.
SHORT_FIT = ["fit", "--config", DEMO_CONFIG, "--trainer.max_steps", "6", "--trainer.val_check_interval", "2"]
SHORT_FIT += ["--trainer.enable_progress_bar", "false", "--samples.prompts", "[]"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own data cache, never the user's ~/.cache."""
    monkeypatch.setenv("QLORA_LIT_CACHE", str(tmp_path_factory.getbasetemp() / "qlora_lit_cache"))


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


def fit_in_subprocess(folder: Path, *args: str, entry: tuple[str, ...] = ("-m", "qlora_lit")) -> Path:
    """`fit` of the demo config with `args` in a child process (several ranks need their own processes), logging
    under `folder`; returns the run folder. The child sees no Slurm job's variables (they would redirect Lightning)
    and uses one thread per process: two ranks share the 2 cores, and runs repeat bit for bit."""
    root = Path(__file__).resolve().parents[1]
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    env.update(PYTHONPATH=f"{root}:{root / 'tests'}", OMP_NUM_THREADS="1")
    command = [sys.executable, *entry, "fit", "--config", DEMO_CONFIG, *args]
    command += ["--trainer.logger.init_args.save_dir", str(folder), "--trainer.enable_progress_bar", "false"]
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return folder / "demo" / "version_0"


def checkpoint_at(run: Path, step: int) -> dict:
    """The checkpoint a run saved at `step` (qlora_lit's file names start with the step)."""
    (path,) = (run / "checkpoints").glob(f"step{step:06d}-*.ckpt")
    return torch.load(path, weights_only=True)


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

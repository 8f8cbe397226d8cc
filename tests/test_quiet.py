"""What a user sees: the data summary, the attention choice, the first step's time; not the libraries' tips."""

from __future__ import annotations

import logging

from conftest import fit_in_subprocess
from lightning.pytorch.utilities import rank_zero_info

import qlora_lit  # noqa: F401 - importing the package installs the filters (alone, this file imported it nowhere)

NOISE = ("litlogger", "num_workers", "on_before_batch_transfer", "LeafSpec", "gemm_4bit_forward", "deprecated")


def test_a_fit_prints_what_matters_and_no_library_tips(tmp_path):
    run = fit_in_subprocess(tmp_path, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2")
    log = (tmp_path / "log.txt").read_text()
    assert (run / "adapter").is_dir()
    for wanted in ("data builtin:koalpaca_sample.jsonl: {", "model.attn_implementation auto: sdpa for llama"):
        assert wanted in log
    assert "first optimizer step: " in log
    assert [text for text in NOISE if text in log] == []


def test_lightning_gpu_tips_are_filtered(caplog):
    caplog.set_level(logging.INFO)
    rank_zero_info(
        "You are using a CUDA device ('NVIDIA H200') that has Tensor Cores. To properly utilize them, you "
        "should set `torch.set_float32_matmul_precision('medium' | 'high')` which will trade-off"
    )
    rank_zero_info("data summary stays")
    assert "Tensor Cores" not in caplog.text and "data summary stays" in caplog.text

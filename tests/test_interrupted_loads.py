"""A model or data set whose download or copy stopped halfway ends in one message saying what to run again, and the
same command works once the files are whole, with nothing to clean up first (qlora_lit/downloads.py,
docs/RELIABILITY.md)."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import SHORT_FIT
from huggingface_hub import constants

from qlora_lit.assets import resolve_asset
from qlora_lit.cli import cli_main
from qlora_lit.downloads import unfinished_load

TINY = Path(resolve_asset("builtin:tiny-llama"))


def fit_with(model: str, save_dir: Path):
    overrides = ["--model.model_name_or_path", model, "--trainer.max_steps", "2", "--data.val_size", "8"]
    return cli_main([*SHORT_FIT, *overrides, "--trainer.logger.init_args.save_dir", str(save_dir)])


def fails_with_one_message(capsys, model: str, save_dir: Path) -> str:
    with pytest.raises(SystemExit) as exit_info:
        fit_with(model, save_dir)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.startswith("qlora_lit: error: "), error[-3000:]
    assert "Traceback" not in error and "neither a local folder" not in error
    return error


def test_a_model_folder_copied_halfway_is_named_and_the_same_command_works_once_it_is_whole(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(sys, "argv", ["qlora_lit"])
    model = tmp_path / "model"
    shutil.copytree(TINY, model)
    weights = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(weights[:100_000])  # a copy that stopped
    error = fails_with_one_message(capsys, str(model), tmp_path / "runs")
    assert f"{model / 'model.safetensors'} is cut short (100,000 of its {len(weights):,} bytes)" in error, error
    assert "Copy or download it again, then run the same command" in error
    (model / "model.safetensors").write_bytes(weights)  # the copy, done again
    assert fit_with(str(model), tmp_path / "runs").trainer.global_step == 2


def cache_with_a_partial_download(cache: Path, repo_id: str) -> tuple[Path, Path, bytes]:
    """`repo_id` in a hub cache as huggingface_hub leaves it when the download of the weights was cut off: every
    other file in the snapshot, the weights as `blobs/<hash>.incomplete` holding their first bytes."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    for source in TINY.iterdir():
        data = source.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        if source.name == "model.safetensors":
            blob.with_name(blob.name + ".incomplete").write_bytes(data[: len(data) // 3])
            weights = (blob, snapshot / source.name, data)
            continue
        blob.write_bytes(data)
        (snapshot / source.name).symlink_to(os.path.relpath(blob, snapshot))
    return weights


def test_an_interrupted_hub_download_says_to_run_again_and_works_once_finished(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["qlora_lit"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # where transformers and hub look
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    blob, link, data = cache_with_a_partial_download(tmp_path / "hub", "qlora-test/tiny")
    error = fails_with_one_message(capsys, "qlora-test/tiny", tmp_path / "runs")
    assert "the download of the model 'qlora-test/tiny' did not finish: 1 file(s) in" in error, error
    assert "are partial (*.incomplete). Run the same command again where the hub can be reached" in error
    # What huggingface_hub does when the download goes on: the partial file completed, renamed, linked.
    partial = blob.with_name(blob.name + ".incomplete")
    partial.write_bytes(partial.read_bytes() + data[partial.stat().st_size :])
    partial.rename(blob)
    link.symlink_to(os.path.relpath(blob, link.parent))
    assert fit_with("qlora-test/tiny", tmp_path / "runs").trainer.global_step == 2


def test_an_interrupted_dataset_download_is_said_too(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    (tmp_path / "datasets--beomi--KoAlpaca-v1.1a" / "blobs").mkdir(parents=True)
    assert unfinished_load("dataset", "beomi/KoAlpaca-v1.1a") is None
    (tmp_path / "datasets--beomi--KoAlpaca-v1.1a" / "blobs" / "9f3e.incomplete").write_bytes(b"{")
    assert "the download of the dataset 'beomi/KoAlpaca-v1.1a' did not finish" in unfinished_load(
        "dataset", "beomi/KoAlpaca-v1.1a"
    )

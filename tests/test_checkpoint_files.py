"""A checkpoint file that is not a whole checkpoint (damaged on disk, another kind of file, not there) is named in one
message before anything loads, and `--ckpt_path last` passes over a damaged newest checkpoint to the newest whole one
of the run (docs/RELIABILITY.md)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEMO_CONFIG, SHORT_FIT

from qlora_lit.cli import cli_main
from qlora_lit.errors import ConfigError
from qlora_lit.resume import checkpoint_to_resume


class RunsCode:
    """Unpickling it runs code: here, it creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: Path) -> None:
    """A disk fault in the middle of the file (inside a tensor's bytes), which torch.load would not notice."""
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))


def bad_files(folder: Path, checkpoint: Path, adapter: Path) -> dict[str, tuple[Path, str]]:
    """name: (file, what the message must say)."""
    folder.mkdir()
    (folder / "notes.ckpt").write_text("step 4 looked good\n")
    for name in ("cut.ckpt", "flipped.ckpt"):
        shutil.copy(checkpoint, folder / name)
    cut_short(folder / "cut.ckpt")
    flip_a_byte(folder / "flipped.ckpt")
    torch.save({"x": RunsCode(folder / "marker")}, folder / "runs-code.ckpt")
    torch.save({"weights": torch.zeros(2)}, folder / "weights.pt")
    return {
        "text": (folder / "notes.ckpt", "is not a checkpoint: torch.save writes zip archives"),
        "cut short": (folder / "cut.ckpt", "is damaged: it is cut short"),
        "flipped bytes": (folder / "flipped.ckpt", "is damaged: the bytes of its entry archive/data/"),
        "missing": (folder / "gone.ckpt", "gone.ckpt does not exist"),
        "folder": (folder, "is a folder; give a .ckpt file"),
        "safetensors": (
            adapter,
            "is a safetensors file (an adapter's or a model's weights), not a training checkpoint",
        ),
        "runs code": (folder / "runs-code.ckpt", "holds Python objects (getattr) that a checkpoint needs not hold"),
        "plain torch file": (folder / "weights.pt", "is no training checkpoint (it holds ['weights'])"),
    }


def test_a_file_that_is_no_whole_checkpoint_is_one_message(trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["qlora_lit"])
    run, _ = trained_run
    cases = bad_files(
        tmp_path / "bad", run / "checkpoints" / "last.ckpt", run / "adapter" / "adapter_model.safetensors"
    )
    for name, (path, expected) in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            cli_main(
                [*SHORT_FIT, "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--ckpt_path", str(path)]
            )
        error = capsys.readouterr().err
        assert exit_info.value.code == 2, (name, error[-2000:])
        assert error.startswith("qlora_lit: error: ") and str(path) in error and expected in error, (name, error)
        assert (
            "Traceback" not in error
            and "weights_only=False" not in error
            and "weights_only` set to `False`" not in error
        )
    assert not (tmp_path / "bad" / "marker").exists()  # the pickled code never ran


def test_best_without_a_ranking_metric_says_so(trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["qlora_lit"])
    no_ranking = ["--checkpoint.monitor", "null", "--checkpoint.save_top_k", "1"]
    with pytest.raises(SystemExit):
        cli_main([*SHORT_FIT, *no_ranking, "--trainer.logger.init_args.save_dir", str(tmp_path), "--ckpt_path", "best"])
    assert (
        "--ckpt_path best means the checkpoint with the best checkpoint.monitor value, and checkpoint.monitor is "
        "null" in capsys.readouterr().err
    )
    with pytest.raises(SystemExit):  # Lightning's own refusal of this pair was a traceback
        cli_main([*SHORT_FIT, "--checkpoint.monitor", "null", "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert "checkpoint.save_top_k=3 keeps the best checkpoints by checkpoint.monitor, which is null" in (
        capsys.readouterr().err
    )


def test_best_is_the_checkpoint_the_run_ranked_best(trained_run, tmp_path):
    folder = trained_run[0] / "checkpoints"
    best = checkpoint_to_resume("best", folder, "val_loss")
    losses = {path.name: float(path.stem.split("val_loss")[1]) for path in folder.glob("step*.ckpt")}
    assert Path(best).name == min(losses, key=losses.get)
    with pytest.raises(ConfigError, match="rank none by 'train_loss'"):
        checkpoint_to_resume("best", folder, "train_loss")


def copy_run(run: Path, save_dir: Path) -> Path:
    """The trained run (checkpoints at steps 2 and 4, last.ckpt at 4) as version_0 of `save_dir/demo`, with the
    checkpoints' order in time kept."""
    copy = save_dir / "demo" / "version_0"
    shutil.copytree(run, copy)
    for age, name in enumerate(["last.ckpt", "step000004", "step000002"]):
        (path,) = (copy / "checkpoints").glob(f"{name}*")
        os.utime(path, (1_000_000 - age, 1_000_000 - age))
    return copy


def test_ckpt_path_last_passes_over_damaged_checkpoints_to_the_newest_whole_one(trained_run, tmp_path, monkeypatch):
    """last.ckpt cut short and step 4's top-k checkpoint with a changed byte (disk faults, not our writes): the
    resume names both and continues from step 2, in the same run, to the end."""
    monkeypatch.setattr(sys, "argv", ["qlora_lit"])
    run = copy_run(trained_run[0], tmp_path)
    cut_short(run / "checkpoints" / "last.ckpt")
    (step_4,) = (run / "checkpoints").glob("step000004*")
    flip_a_byte(step_4)
    (step_2,) = (run / "checkpoints").glob("step000002*")
    with pytest.warns(UserWarning) as warnings:
        cli = cli_main([*SHORT_FIT, "--trainer.logger.init_args.save_dir", str(tmp_path), "--ckpt_path", "last"])
    said = " ".join(str(warning.message) for warning in warnings)
    assert f"checkpoint {run / 'checkpoints' / 'last.ckpt'} is damaged: it is cut short" in said, said
    assert f"checkpoint {step_4} is damaged: the bytes of its entry" in said
    assert f"Resuming from {step_2}, the newest whole one" in said
    assert cli.trainer.ckpt_path == str(step_2) and Path(cli.trainer.log_dir) == run
    assert cli.trainer.global_step == 6
    # (a run folder moved since its checkpoints were written gets Lightning's last-v1.ckpt beside the damaged file)
    newest = checkpoint_to_resume("last", run / "checkpoints", "val_loss")
    assert torch.load(newest, weights_only=True)["global_step"] == 6


def test_when_no_checkpoint_of_the_run_is_whole_last_says_which(tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"PK\x03\x04" + bytes(100))
    (tmp_path / "step000002.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError) as error:
        checkpoint_to_resume("last", tmp_path, "val_loss")
    message = str(error.value)
    assert message.startswith(f"--ckpt_path last: no checkpoint in {tmp_path} is whole")
    assert (
        "last.ckpt is damaged: it is cut short" in message
        and "step000002.ckpt is damaged: the file is empty" in message
    )


def test_validate_with_ckpt_path_last_takes_the_newest_run_of_the_config(trained_run, tmp_path, monkeypatch):
    """Not the new, empty folder validate logs into (Lightning found no last.ckpt there and validated the untrained
    adapters, with one warning)."""
    monkeypatch.setattr(sys, "argv", ["qlora_lit"])
    run = copy_run(trained_run[0], tmp_path)
    args = ["validate", "--config", DEMO_CONFIG, "--data.val_size", "8", "--samples.prompts", "[]"]
    cli = cli_main([*args, "--trainer.logger.init_args.save_dir", str(tmp_path), "--ckpt_path", "last"])
    assert cli.trainer.ckpt_path == str(run / "checkpoints" / "last.ckpt")

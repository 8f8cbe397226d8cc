"""`fit --ckpt_path last` continues the newest run of the config instead of training a new folder from step 0."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
from conftest import DEMO_CONFIG
from jsonargparse import Namespace

from qlora_lit.cli import cli_main
from qlora_lit.errors import ConfigError
from qlora_lit.resume import continue_newest_run, refuse_a_used_run_folder


def logger_config(save_dir: Path, version=None) -> Namespace:
    return Namespace(
        class_path="TensorBoardLogger", init_args=Namespace(save_dir=str(save_dir), name="demo", version=version)
    )


def save_last(run: Path, mtime: float, name: str = "last.ckpt") -> Path:
    path = run / "checkpoints" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"checkpoint")
    os.utime(path, (mtime, mtime))
    return path


def test_an_unfixed_version_becomes_the_folder_of_the_newest_last_checkpoint(tmp_path):
    save_last(tmp_path / "demo" / "version_0", 2_000)  # saved last, though its folder is older
    save_last(tmp_path / "demo" / "version_1", 1_000)
    (tmp_path / "demo" / "version_2").mkdir()  # a run that saved nothing
    logger = logger_config(tmp_path)
    continue_newest_run(logger)
    assert logger.init_args.version == "version_0"
    # Lightning's last-v1.ckpt (a moved run folder resumed) counts, as it does for Lightning's own choice.
    save_last(tmp_path / "demo" / "version_1", 3_000, name="last-v1.ckpt")
    continue_newest_run(logger := logger_config(tmp_path))
    assert logger.init_args.version == "version_1"


def test_with_no_checkpoint_anywhere_training_starts_over_with_a_warning(tmp_path):
    logger = logger_config(tmp_path)
    with pytest.warns(UserWarning, match="no run in .*demo has a checkpoints/last.ckpt; starting at step 0"):
        continue_newest_run(logger)
    assert logger.init_args.version is None


def test_a_fixed_version_is_kept_and_an_earlier_runs_checkpoint_is_named(tmp_path):
    earlier = save_last(tmp_path / "demo" / "slurm-41", 1_000)
    logger = logger_config(tmp_path, version="slurm-42")
    with pytest.warns(UserWarning, match=f"slurm-42/checkpoints has no last.ckpt.*--ckpt_path {earlier}"):
        continue_newest_run(logger)
    assert logger.init_args.version == "slurm-42"


def test_a_fixed_version_with_its_own_checkpoint_says_nothing(tmp_path, recwarn):
    save_last(tmp_path / "demo" / "version_3", 1_000)
    save_last(tmp_path / "demo" / "version_4", 2_000)
    logger = logger_config(tmp_path, version=3)
    continue_newest_run(logger)
    assert logger.init_args.version == 3 and not [w for w in recwarn if "ckpt_path" in str(w.message)]


def test_loggers_without_a_folder_layout_are_left_alone():
    for logger in (None, False, [logger_config(Path("runs"))]):
        continue_newest_run(logger)


def test_a_fixed_version_that_holds_a_run_is_refused_without_ckpt_path(tmp_path):
    """A second fit into `--trainer.logger.init_args.version myrun` started at step 0 in the first run's folder and
    overwrote its adapter, config and checkpoints."""
    run = tmp_path / "demo" / "myrun"
    save_last(run, 1_000, name="step000002-val_loss3.9960.ckpt")
    (tmp_path / "demo" / "version_3" / "adapter").mkdir(parents=True)
    (tmp_path / "demo" / "killed" / "checkpoints").mkdir(parents=True)  # killed before its first checkpoint
    (tmp_path / "demo" / "killed" / "events.out.tfevents.1").write_bytes(b"")
    for version in ("myrun", 3):
        folder = tmp_path / "demo" / ("myrun" if version == "myrun" else "version_3")
        message = f"{folder} already holds a run: continue it with --ckpt_path last, or choose another trainer.logger"
        with pytest.raises(ConfigError, match=message):
            refuse_a_used_run_folder(logger_config(tmp_path, version=version))
    for version in ("killed", "new", None):  # nothing to lose there, or a new version_N
        refuse_a_used_run_folder(logger_config(tmp_path, version=version))
    (tmp_path / "adapter").mkdir()
    with pytest.raises(ConfigError, match="already holds a run: .* or choose another trainer.default_root_dir"):
        refuse_a_used_run_folder(False, str(tmp_path))  # --trainer.logger false: the run's folder is default_root_dir
    refuse_a_used_run_folder(None, str(tmp_path))  # null: Lightning's own logger, which numbers its versions


def test_fit_refuses_a_fixed_version_that_holds_a_run_before_writing_anything(tmp_path, capsys):
    run = tmp_path / "demo" / "myrun"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("the first run's")
    with pytest.raises(SystemExit) as exit_info:
        demo_fit(tmp_path, 2, "--trainer.logger.init_args.version", "myrun")
    assert exit_info.value.code == 2
    assert f"{run} already holds a run: continue it with --ckpt_path last" in capsys.readouterr().err
    assert sorted(path.name for path in run.iterdir()) == ["adapter", "config.yaml"]
    assert (run / "config.yaml").read_text() == "the first run's"


def demo_fit(save_dir: Path, max_steps: int, *args: str):
    overrides = ["--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.max_steps", str(max_steps)]
    overrides += ["--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false"]
    return cli_main(["fit", "--config", DEMO_CONFIG, *overrides, "--samples.prompts", "[]", *args])


def test_fit_with_ckpt_path_last_continues_the_run_in_its_own_folder(tmp_path):
    """A 2-step demo run, then `fit --ckpt_path last` to step 4: restored from the first run's last.ckpt, trained on
    in the same folder, its last.ckpt overwritten."""
    demo_fit(tmp_path, 2)
    last = tmp_path / "demo" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = demo_fit(tmp_path, 4, "--ckpt_path", "last")
    assert cli.trainer.ckpt_path == str(last)  # what Lightning restored from
    assert Path(cli.trainer.log_dir) == last.parent.parent
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["version_0"]
    assert not [w for w in caught if "data settings changed" in str(w.message)]
    assert sorted(p.name for p in last.parent.glob("last*")) == ["last.ckpt"]
    assert cli.trainer.global_step == 4 and torch.load(last, weights_only=True)["global_step"] == 4
    # another seed splits and orders the rows otherwise: trained rows could become validation rows, silently before
    with pytest.warns(UserWarning, match=r"data settings changed since the checkpoint \(data.seed 42 -> 43\)"):
        demo_fit(tmp_path, 5, "--ckpt_path", "last", "--data.seed", "43")

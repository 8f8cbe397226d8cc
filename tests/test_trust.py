"""Trust: code shipped with a model runs only when the user asks for it, never because a file they did not write
(an adapter's or model folder's saved config, a checkpoint) says so; a resume runs the user's settings."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DEMO_CONFIG

from qlora_lit.assets import resolve_asset
from qlora_lit.cli import cli_main

CONFIG_CODE = """
from pathlib import Path
from transformers import LlamaConfig

Path({marker!r}).write_text("the model's own code ran")  # transformers runs a copy in its modules cache


class PlantedConfig(LlamaConfig):
    model_type = "planted_llama"
"""
MODEL_CODE = """
from transformers import LlamaForCausalLM
from .configuration_planted import PlantedConfig


class PlantedForCausalLM(LlamaForCausalLM):
    config_class = PlantedConfig
"""
MARKER = "REMOTE_CODE_RAN"


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["qlora_lit"])


@pytest.fixture
def planted(tmp_path) -> Path:
    """The tiny Llama as a hub repository with its own Python code would ship it; the code writes a marker."""
    folder = tmp_path / "planted-model"
    shutil.copytree(resolve_asset("builtin:tiny-llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "planted_llama"
    config["architectures"] = ["PlantedForCausalLM"]
    config["auto_map"] = {
        "AutoConfig": "configuration_planted.PlantedConfig",
        "AutoModelForCausalLM": "modeling_planted.PlantedForCausalLM",
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_planted.py").write_text(CONFIG_CODE.format(marker=str(folder / MARKER)))
    (folder / "modeling_planted.py").write_text(MODEL_CODE)
    return folder


def ran(planted: Path) -> bool:
    return (planted / MARKER).exists()


def adapter_naming(planted: Path, trained_run, tmp_path) -> Path:
    """A copy of a trained adapter whose saved config names the planted model and turns remote code on."""
    adapter = tmp_path / "downloaded-adapter"
    shutil.copytree(trained_run[0] / "adapter", adapter)
    saved = yaml.safe_load((adapter / "qlora_lit_config.yaml").read_text())
    saved["model"].update(model_name_or_path=str(planted), trust_remote_code=True)
    (adapter / "qlora_lit_config.yaml").write_text(yaml.safe_dump(saved))
    return adapter


GENERATE = ["--prompt", "안녕?", "--generation.max_new_tokens", "2", "--dtype", "fp32", "--quantize", "none"]


@pytest.mark.parametrize("command", ["generate", "chat", "export"])
def test_an_adapters_saved_config_cannot_run_the_base_models_code(command, planted, trained_run, tmp_path, capsys):
    adapter = adapter_naming(planted, trained_run, tmp_path)
    extra = {
        "generate": GENERATE,
        "chat": GENERATE[2:],  # no --prompt: it reads stdin, which it never gets to
        "export": ["--output", str(tmp_path / "merged"), "--dtype", "fp32"],
    }[command]
    with pytest.raises(SystemExit) as exit_info:
        cli_main([command, "--adapter", str(adapter), *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and not ran(planted)
    assert f"base model: '{planted}', as named in the adapter folder" in err  # shown before anything loads
    assert "says trust_remote_code: true; a file you did not write never turns it on" in err
    assert "ships its own Python code, which qlora_lit runs only when you say so" in err
    assert not (tmp_path / "merged").exists()


def test_a_model_folders_saved_config_cannot_either_but_the_users_flag_can(planted, trained_run, capsys):
    shutil.copyfile(trained_run[0] / "adapter" / "qlora_lit_config.yaml", planted / "qlora_lit_config.yaml")
    saved = yaml.safe_load((planted / "qlora_lit_config.yaml").read_text())
    saved["model"]["trust_remote_code"] = True
    (planted / "qlora_lit_config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(SystemExit):
        cli_main(["generate", "--model", str(planted), *GENERATE])
    assert not ran(planted)
    answers = cli_main(["generate", "--model", str(planted), *GENERATE, "--trust_remote_code", "true"])
    assert ran(planted) and len(answers) == 1  # the user's own flag is honoured


def planted_checkpoint(planted: Path, trained_run, tmp_path) -> Path:
    """The trained run's last checkpoint with hyperparameters naming the planted model and trusting its code."""
    checkpoint = torch.load(trained_run[0] / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"].update(model_name_or_path=str(planted), trust_remote_code=True)
    path = tmp_path / "downloaded.ckpt"
    torch.save(checkpoint, path)
    return path


def resume(ckpt: Path, root: Path, *extra: str):
    args = ["fit", "--config", DEMO_CONFIG, "--ckpt_path", str(ckpt), "--trainer.max_steps", "5"]
    args += ["--trainer.enable_progress_bar", "false", "--samples.prompts", "[]"]
    return cli_main([*args, "--trainer.logger.init_args.save_dir", str(root), *extra])


def test_a_checkpoints_hyperparameters_neither_run_code_nor_replace_the_users_settings(planted, trained_run, tmp_path):
    cli = resume(planted_checkpoint(planted, trained_run, tmp_path), tmp_path / "runs", "--model.optimizer.lr", "1e-6")
    assert not ran(planted) and cli.trainer.global_step == 5
    recorded = yaml.safe_load((Path(cli.trainer.log_dir) / "config.yaml").read_text())["model"]
    assert recorded["model_name_or_path"] == "builtin:tiny-llama" and recorded["trust_remote_code"] is False
    assert recorded["optimizer"]["lr"] == 1e-6
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs == [1e-6]  # the checkpoint's 2e-3 would otherwise continue
    (lr,) = {group["lr"] for group in cli.trainer.optimizers[0].param_groups}
    assert lr == pytest.approx(1e-6 * scheduler.lr_lambdas[0](scheduler.last_epoch))


def test_a_resume_that_would_change_the_adapters_is_refused_naming_each_change(trained_run, tmp_path, capsys):
    ckpt = trained_run[0] / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit):
        resume(ckpt, tmp_path / "runs", "--model.lora.r", "16", "--model.quantization.quant_type", "fp4")
    err = capsys.readouterr().err
    assert "model.lora.r was 8, now 16" in err and "model.quantization.quant_type was 'nf4', now 'fp4'" in err


def test_export_never_writes_over_into_or_around_its_input(trained_run, tmp_path, capsys):
    """`--output` the run folder holding the adapter, with --overwrite: it deleted the whole run, adapter included."""
    adapter = tmp_path / "run" / "adapter"
    shutil.copytree(trained_run[0] / "adapter", adapter)
    before = sorted(path.name for path in adapter.iterdir())
    for output in (adapter, adapter / "merged", adapter.parent, tmp_path):
        with pytest.raises(SystemExit):
            cli_main(["export", "--adapter", str(adapter), "--output", str(output), "--overwrite", "true"])
        assert "is the --adapter folder, inside it, or holds it (a run folder)" in capsys.readouterr().err
    assert sorted(path.name for path in adapter.iterdir()) == before


def test_a_resumed_run_keeps_the_users_files_in_its_adapter_folder(tmp_path):
    first = resume_free_fit(tmp_path, "2")
    adapter = Path(first.trainer.log_dir) / "adapter"
    (adapter / "answers.jsonl").write_text('{"generated": "mine"}\n')
    (adapter / "merged").mkdir()
    (adapter / "merged" / "config.json").write_text("{}")
    resume_free_fit(tmp_path, "4", "--ckpt_path", "last")
    assert json.loads((adapter / "trainer_state.json").read_text())["global_step"] == 4  # replaced by the resume
    assert (adapter / "answers.jsonl").read_text() == '{"generated": "mine"}\n'
    assert (adapter / "merged" / "config.json").is_file()


def resume_free_fit(root: Path, max_steps: str, *extra: str):
    args = ["fit", "--config", DEMO_CONFIG, "--trainer.max_steps", max_steps, "--trainer.val_check_interval", "2"]
    args += ["--trainer.enable_progress_bar", "false", "--samples.prompts", "[]"]
    return cli_main([*args, "--trainer.logger.init_args.save_dir", str(root), *extra])

"""Each setting is declared once: the model's arguments and the data module's fields are what checkpoints keep and
what `fit --help` explains."""

from __future__ import annotations

import inspect
import re
from dataclasses import asdict, fields

import pytest
import torch
from conftest import SAMPLE_DATA, TINY_MODEL

from qlora_lit.cli import cli_main
from qlora_lit.data import KoAlpacaDataModule
from qlora_lit.model import LoraArgs, QuantizationArgs
from qlora_lit.module import QLoRAModule
from qlora_lit.optim import OptimizerArgs


def test_the_models_checkpointed_settings_are_its_arguments_as_plain_containers():
    lora, optimizer = LoraArgs(r=4, target_modules=["q_proj"]), OptimizerArgs(lr=1e-3, betas=(0.8, 0.9))
    module = QLoRAModule(TINY_MODEL, lora=lora, optimizer=optimizer, loss_chunk_tokens=0, compile=True)
    arguments = set(inspect.signature(QLoRAModule).parameters)
    assert set(module.hparams) == arguments - {"generation"}  # see checkpointed_settings
    assert module.hparams["lora"] == asdict(lora) and module.hparams["optimizer"] == asdict(optimizer)
    assert module.hparams["quantization"] == asdict(QuantizationArgs())
    assert (module.hparams["loss_chunk_tokens"], module.hparams["compile"]) == (0, True)
    plain = (str, int, float, bool, list, tuple, dict, type(None))
    assert all(isinstance(value, plain) for value in module.hparams.values())


def test_the_data_modules_fields_are_its_settings_and_its_hyperparameters():
    data = KoAlpacaDataModule(SAMPLE_DATA, TINY_MODEL, max_length=96, pack_length=0, val_size=4)
    assert list(inspect.signature(KoAlpacaDataModule).parameters) == [field.name for field in fields(data)]
    assert dict(data.hparams) == {field.name: field.default for field in fields(data)} | {
        "path": SAMPLE_DATA,
        "max_length": 96,
        "pack_length": 0,
        "val_size": 4,
    }
    assert (data.tokenizer_name, data.tokenizer, data.pack_length) == (TINY_MODEL, None, None)  # loaded in setup


def test_fit_help_explains_every_model_and_data_setting(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--help"])
    options = re.split(r"\n(?=  --)", capsys.readouterr().out)
    settings = [text for text in options if text.startswith(("  --model.", "  --data."))]
    assert len(settings) > 40
    option = re.compile(r"\s*--\S+(?: (?:\{\S*\}|[A-Z_]+))?(?:, --\S+ [A-Z_]+)?")  # the flag and its metavar
    explanations = {text.split()[0]: option.sub("", text, count=1).split("(type:")[0].split() for text in settings}
    assert [name for name, words in explanations.items() if len(words) < 3] == []
    shown = {text.split()[0]: " ".join(text.split()) for text in settings}
    assert "Longest example in tokens." in shown["--data.max_length"]
    assert "Rank of the update matrices" in shown["--model.lora.r"]


def test_the_compile_setting_leaves_nn_module_compile_alone():
    module = QLoRAModule(TINY_MODEL, compile=True)
    assert module.compile_layers is True and module.hparams["compile"] is True  # the key stays model.compile
    assert module.compile.__func__ is torch.nn.Module.compile

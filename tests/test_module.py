"""The LightningModule on the real 4-bit pipeline (bitsandbytes on the CPU): structure, checkpoints, adapters."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from unittest import mock

import bitsandbytes as bnb
import lightning as L
import pytest
import torch
from conftest import SAMPLE_DATA, TINY_MODEL, cpu_trainer, plain_peft
from lightning.pytorch.callbacks import ModelCheckpoint

from qlora_lit.assets import resolve_asset
from qlora_lit.callbacks import AdapterExport
from qlora_lit.data import KoAlpacaDataModule
from qlora_lit.errors import ConfigError
from qlora_lit.model import LoraArgs, QuantizationArgs, count_lora_parameters
from qlora_lit.module import QLoRAModule
from qlora_lit.optim import OptimizerArgs

FP32 = QuantizationArgs(compute_dtype="float32")


def make_module(r: int = 8) -> QLoRAModule:
    return QLoRAModule(TINY_MODEL, quantization=FP32, lora=LoraArgs(r=r, alpha=2 * r), optimizer=OptimizerArgs(lr=5e-3))


class CountingExport(AdapterExport):
    def __init__(self) -> None:
        super().__init__()
        self.written_at: list[int] = []

    def write_adapter(self, trainer: L.Trainer, *args) -> None:
        self.written_at.append(trainer.global_step)
        super().write_adapter(trainer, *args)


def make_trainer(root: Path, max_steps: int) -> L.Trainer:
    return cpu_trainer(root, max_steps, [CountingExport(), ModelCheckpoint(dirpath=root / "ckpt", save_last=True)])


def lora_state(module: QLoRAModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}


@pytest.fixture(scope="module")
def datamodule():
    data = KoAlpacaDataModule(SAMPLE_DATA, TINY_MODEL, max_length=128, batch_size=4, val_size=8)
    data.setup()
    return data


@pytest.fixture(scope="module")
def trained(tmp_path_factory, datamodule):
    root = tmp_path_factory.mktemp("run")
    module = make_module()
    trainer = make_trainer(root, max_steps=4)
    trainer.fit(module, datamodule)
    return root, trainer, module


def test_base_is_4bit_with_lora_and_only_lora_trains():
    module = make_module()
    module.configure_model()
    four_bit = [m for m in module.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7  # seven projections in each of the two layers
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert len(trainable) == 2 * len(four_bit)
    assert module.model.training  # from_pretrained returns eval mode; LoRA dropout needs train mode
    module.configure_model()  # a second call must not rebuild the model
    assert len([m for m in module.model.modules() if isinstance(m, bnb.nn.Linear4bit)]) == 14


def test_unknown_target_module_lists_the_linear_layers():
    module = QLoRAModule(TINY_MODEL, quantization=FP32, lora=LoraArgs(target_modules=["query", "v_proj"]))
    with pytest.raises(ConfigError, match=r"\['query'\] are not linear layers.*'down_proj'"):
        module.configure_model()


def test_lora_parameters_are_counted_without_memory_and_a_rank_no_layer_can_use_is_refused():
    """peft built the adapters in memory to count them: lora.r 10,000,000 gave no output for minutes."""
    attention = (128 + 128) + 2 * (128 + 64) + (128 + 128)  # in + out features of q, k, v, o
    mlp = 3 * (128 + 256)  # gate, up, down
    assert count_lora_parameters(TINY_MODEL, LoraArgs(r=128)) == 128 * 2 * (attention + mlp)
    for r in (129, 10_000_000):
        with pytest.raises(ConfigError, match=rf"lora.r={r} is more than any .* maps \d+ -> \d+ .* rank 128 at most"):
            count_lora_parameters(TINY_MODEL, LoraArgs(r=r))


def test_the_adapter_is_written_once_per_saved_step(trained):
    _, trainer, _ = trained
    (export,) = [callback for callback in trainer.callbacks if isinstance(callback, CountingExport)]
    assert export.written_at == [2, 4]  # not again for last.ckpt of the same step, nor at the end of fit


def test_training_changes_only_lora_and_checkpoint_excludes_the_base(trained):
    root, trainer, module = trained
    checkpoint = torch.load(root / "ckpt" / "last.ckpt", weights_only=True)
    keys = set(checkpoint["state_dict"])
    assert keys == module.trainable_keys()
    assert all(".lora_" in key for key in keys)
    assert checkpoint["optimizer_states"] and checkpoint["loops"]
    base_bytes = sum(p.stat().st_size for p in Path(resolve_asset(TINY_MODEL)).glob("*.safetensors"))
    adapter_bytes = sum(v.numel() * v.element_size() for v in checkpoint["state_dict"].values())
    assert adapter_bytes < base_bytes / 2
    assert any(v.abs().sum() > 0 for k, v in checkpoint["state_dict"].items() if "lora_B" in k)  # B starts at 0


def test_resume_restores_the_trained_adapters(trained, datamodule, tmp_path):
    root, _, module = trained
    resumed = make_module()
    trainer = make_trainer(tmp_path, max_steps=4)  # already reached: fit restores and stops
    trainer.fit(resumed, datamodule, ckpt_path=root / "ckpt" / "last.ckpt")
    assert trainer.global_step == 4
    expected, got = lora_state(module), lora_state(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_checkpoint_of_another_lora_shape_is_refused(trained, datamodule, tmp_path):
    root, _, _ = trained
    with pytest.raises(ConfigError, match="cannot change what its adapters are: model.lora.r was 8, now 4"):
        make_trainer(tmp_path, max_steps=4).fit(make_module(r=4), datamodule, ckpt_path=root / "ckpt" / "last.ckpt")
    bare = torch.load(root / "ckpt" / "last.ckpt", weights_only=True)
    del bare["hyper_parameters"]  # a checkpoint saved without them: the tensors' shapes still tell
    torch.save(bare, tmp_path / "bare.ckpt")
    with pytest.raises(ConfigError, match="does not match this model's adapters"):
        make_trainer(tmp_path, max_steps=4).fit(make_module(r=4), datamodule, ckpt_path=tmp_path / "bare.ckpt")


def test_adapter_loads_in_plain_peft_with_the_same_logits(trained, datamodule):
    root, trainer, module = trained
    adapter = root / "run" / "version_0" / "adapter"
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= {p.name for p in adapter.iterdir()}
    plain = plain_peft(adapter, FP32)
    batch = next(iter(datamodule.val_dataloader()))
    module.model.eval()
    with torch.no_grad():
        expected = module(batch["input_ids"], batch["attention_mask"]).logits
        got = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_model_that_cannot_be_found_offline_says_how_to_fix_it():
    from qlora_lit.model import load_base_model

    with pytest.raises(ConfigError, match=r"could not load the model 'nobody/no-such-model'(.|\n)*HF_HOME"):
        load_base_model("nobody/no-such-model", FP32)


def test_a_local_model_folder_that_is_incomplete_says_what_it_lacks(tmp_path):
    """An empty folder was a traceback (ValueError: Unrecognized model); one with only config.json blamed a missing
    sentencepiece; a damaged one was "neither a local folder/file nor reachable on the hub"."""
    from qlora_lit.model import load_base_model
    from qlora_lit.tokenizer import load_tokenizer

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        ConfigError, match=r"model '.*empty': the folder has no config.json and no weights .*it is empt"
    ):
        load_base_model(str(empty), FP32)
    with pytest.raises(ConfigError, match=r"tokenizer '.*empty': the folder has no tokenizer files .*it is empty"):
        load_tokenizer(str(empty))
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(Path(resolve_asset(TINY_MODEL)) / "config.json", config_only)
    with pytest.raises(ConfigError, match=r"the folder has no tokenizer files \(tokenizer.json, or tokenizer.model\)"):
        load_tokenizer(str(config_only))
    with pytest.raises(ConfigError, match=r"the folder has no weights \(model.safetensors .*\['config.json'\]"):
        load_base_model(str(config_only), FP32)
    damaged = shutil.copytree(resolve_asset(TINY_MODEL), tmp_path / "damaged")
    (damaged / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(ConfigError, match=r"could not load the model '.*damaged' from its folder: ") as error:
        load_base_model(str(damaged), FP32)
    assert "hub" not in str(error.value)
    weights = shutil.copytree(resolve_asset(TINY_MODEL), tmp_path / "cut_short") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy interrupted: was a SafetensorError traceback
    with pytest.raises(ConfigError, match=r"model '.*cut_short': a weights file is damaged \(Error while deserializ"):
        load_base_model(str(weights.parent), FP32)


def test_a_hub_cache_that_cannot_be_written_is_named(monkeypatch):
    """A read-only home: downloading a hub model fails creating ~/.cache/huggingface (the message said the model
    could not be found)."""
    from transformers import AutoConfig

    from qlora_lit.preflight import model_config

    denied = PermissionError(errno.EACCES, "Permission denied", "/home/u/.cache/huggingface/hub")
    monkeypatch.setattr(AutoConfig, "from_pretrained", mock.Mock(side_effect=denied))
    with pytest.raises(ConfigError, match=r"'org/model': .*Permission denied.* cannot be written .*point HF_HOME at a"):
        model_config("org/model")


def test_compiled_code_is_cached_in_the_temp_folder_when_the_qlora_lit_cache_cannot_be_written(tmp_path, monkeypatch):
    from qlora_lit.model import compile_decoder_layers

    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("QLORA_LIT_CACHE", str(tmp_path / "a_file"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")  # recorded, so torch's own setting is undone after the test
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    module = make_module()
    module.configure_model()
    with pytest.warns(UserWarning, match=r"compiled code is cached in torch's temporary folder: .*a_file/torchind"):
        compile_decoder_layers(module.model)  # marks the layers for compilation; nothing compiles before a forward
    assert "a_file" not in os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")  # torch's default, if anything


def test_resuming_under_another_model_name_warns_and_still_checks_shapes(trained, datamodule, tmp_path):
    root, _, _ = trained
    same_model_elsewhere = QLoRAModule(
        resolve_asset(TINY_MODEL), quantization=FP32, lora=LoraArgs(r=8, alpha=16), optimizer=OptimizerArgs(lr=5e-3)
    )
    with pytest.warns(UserWarning, match="resuming a checkpoint trained on 'builtin:tiny-llama'"):
        make_trainer(tmp_path, max_steps=4).fit(same_model_elsewhere, datamodule, ckpt_path=root / "ckpt" / "last.ckpt")


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_trained_biases_of_a_quantized_base_are_refused_when_the_settings_are_read(bias):
    """bitsandbytes casts a 4/8-bit layer's bias in place to the activations' dtype at every forward: such a bias
    would train in bf16, or stop fp16 training at its first step."""
    for quantization in (QuantizationArgs(), QuantizationArgs(load_in_4bit=False, load_in_8bit=True)):
        with pytest.raises(ConfigError, match=f"lora.bias={bias} would train the biases of the 4-bit"):
            QLoRAModule(TINY_MODEL, quantization, LoraArgs(bias=bias))
    QLoRAModule(TINY_MODEL, QuantizationArgs(load_in_4bit=False), LoraArgs(bias=bias))


def test_fully_trained_modules_train_in_fp32_and_fp16_with_a_gradient_scaler_steps():
    """`lora.modules_to_save` copies train in fp32 like the LoRA matrices, whatever the base's dtype: in fp16 the
    gradient scaler (Lightning's 16-mixed on GPUs before Ampere) refused their fp16 gradients at the first step."""
    quantization = QuantizationArgs(compute_dtype="float16")
    module = QLoRAModule(TINY_MODEL, quantization, LoraArgs(r=4, modules_to_save=["lm_head"]), upcast_to_fp32=False)
    module.configure_model()
    trained = {name: param for name, param in module.model.named_parameters() if param.requires_grad}
    assert any("modules_to_save" in name for name in trained)
    assert {param.dtype for param in trained.values()} == {torch.float32}
    optimizer = torch.optim.AdamW(trained.values())
    scaler = torch.amp.GradScaler("cpu")
    ids = torch.randint(2, 2000, (2, 24))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = module(ids, torch.ones_like(ids), labels=ids).loss
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # ValueError("Attempting to unscale FP16 gradients.") before
    scaler.step(optimizer)
    assert all(param.grad is not None and param.grad.dtype == torch.float32 for param in trained.values())

"""What qlora_lit computes does not depend on the CPU: bitsandbytes' AVX512-BF16 inference layout never reaches the
frozen 4-bit base (qlora_lit.model.keep_training_layout).

On such a CPU (recent Xeon, AMD Zen 4), bitsandbytes 0.50 converts a 4-bit layer in place at its first eval-mode
forward without grad, and from then on passes no gradient to the layer's input. Most machines this suite runs on
lack the instruction set, so the tests make bitsandbytes believe it is there.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from conftest import SAMPLE_DATA, TINY_MODEL, cpu_trainer

from qlora_lit.data import KoAlpacaDataModule
from qlora_lit.model import LoraArgs, QuantizationArgs
from qlora_lit.module import QLoRAModule
from qlora_lit.samples import SampleGenerations


@pytest.fixture
def avx512bf16_cpu(monkeypatch):
    """Every 4-bit layer built from here on takes bitsandbytes' AVX512-BF16 path, whatever this CPU has."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)


def four_bit_layers(module: torch.nn.Module) -> list[bnb.nn.Linear4bit]:
    return [layer for layer in module.modules() if isinstance(layer, bnb.nn.Linear4bit)]


def converted(module: torch.nn.Module) -> list[bnb.nn.Linear4bit]:
    layers = four_bit_layers(module)
    return [layer for layer in layers if getattr(layer.weight.quant_state, "packing_format_for_cpu", False)]


def lora_gradients(module: QLoRAModule, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    module.model.train()
    module.zero_grad()
    loss_sum, _ = module.loss_sum(batch)
    loss_sum.backward()
    return {name: param.grad.clone() for name, param in module.named_parameters() if param.requires_grad}


@pytest.fixture
def module_and_data(avx512bf16_cpu):
    module = QLoRAModule(TINY_MODEL, quantization=QuantizationArgs(compute_dtype="float32"), lora=LoraArgs(dropout=0.0))
    module.configure_model()
    for lora_b in (param for name, param in module.named_parameters() if "lora_B" in name):
        torch.nn.init.normal_(lora_b, std=0.05)  # B starts at zero: let the adapters shape the gradients
    data = KoAlpacaDataModule(SAMPLE_DATA, TINY_MODEL, max_length=64, batch_size=4, val_size=8)
    data.setup()
    return module, data


def test_the_fixture_puts_the_layers_on_the_avx512bf16_path(avx512bf16_cpu):
    """Without this, the tests below could pass for the wrong reason (a layer built before the patch)."""
    layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32)
    assert layer.support_avx512bf16_for_cpu


def test_an_eval_forward_without_grad_leaves_the_base_and_its_gradients_as_they_were(module_and_data):
    module, data = module_and_data
    assert len(four_bit_layers(module)) == 14
    batch = next(iter(data.train_dataloader()))
    before = lora_gradients(module, batch)
    module.model.eval()
    with torch.no_grad():
        eval_logits = module(batch["input_ids"], batch["attention_mask"]).logits
    assert not converted(module)
    after = lora_gradients(module, batch)
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=name)
    with torch.no_grad():  # train mode (dropout 0) computes the same logits as the eval forward did
        train_logits = module(batch["input_ids"], batch["attention_mask"]).logits
    torch.testing.assert_close(eval_logits, train_logits, rtol=0, atol=0)


def test_validation_and_samples_do_not_convert_the_base(module_and_data, tmp_path):
    module, data = module_and_data
    trainer = cpu_trainer(tmp_path, max_steps=1, callbacks=[SampleGenerations(max_new_tokens=4)])
    trainer.validate(module, data)
    assert not converted(module)
    assert not any(layer.support_avx512bf16_for_cpu for layer in four_bit_layers(module))

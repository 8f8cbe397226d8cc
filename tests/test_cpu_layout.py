"""What qlora_lit computes does not depend on the CPU: bitsandbytes' AVX512-BF16 inference layout never reaches the
frozen 4-bit base (qlora_lit.model.keep_training_layout).

On such a CPU (recent Xeon, AMD Zen 4), bitsandbytes 0.50 converts a 4-bit layer in place at its first eval-mode
forward without grad, and from then on passes no gradient to the layer's input. Most machines this suite runs on
lack the instruction set, so the tests make bitsandbytes believe it is there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from conftest import SAMPLE_DATA, TINY_MODEL, cpu_trainer

from qlora_lit.data import KoAlpacaDataModule
from qlora_lit.model import LoraArgs, QuantizationArgs
from qlora_lit.module import QLoRAModule
from qlora_lit.samples import SampleGenerations

ROOT = Path(__file__).resolve().parents[1]


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


AVX2_CHECKS = [
    "tests/test_module.py::test_adapter_loads_in_plain_peft_with_the_same_logits",
    "tests/test_packing.py::test_logits_of_a_packed_row_equal_those_of_the_examples_run_separately",
    "tests/test_dequantized.py::test_kept_weights_train_exactly_as_the_4bit_layers",
    "tests/test_loss_normalisation.py",
]


def test_a_cpu_without_avx512_computes_the_same_training(tmp_path):
    """Most laptops have AVX2 only. torch and bitsandbytes choose kernels by the CPU's instruction set (bitsandbytes:
    its int8 matmul and 4-bit dequantization dispatch on `torch.backends.cpu.get_cpu_capability()`), so the numeric
    tests run again, in a process held to AVX2, wherever this suite runs."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    probe = "import torch, bitsandbytes.backends.cpu.ops as ops; print(torch.backends.cpu.get_cpu_capability())"
    probe += "; print(ops._has_avx512)"
    seen = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert seen.stdout.split() == ["AVX2", "False"]
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--basetemp",
        str(tmp_path),
        *AVX2_CHECKS,
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_an_8bit_layer_on_a_cpu_trains_on_its_dequantized_weight_and_evaluates_in_int8():
    """bitsandbytes 0.50 on a CPU: an 8-bit base layer in training computes with its dequantized weight (MatMul8bitFp,
    no activation quantization), in eval mode (validation, samples, generation) through int8 activations
    (MatMul8bitLt), as on a GPU in both. docs/ARCHITECTURES.md says what this means for 8-bit bases on a CPU; when
    this fails, bitsandbytes has changed the CPU path and the page is to be read again."""
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 32, bias=False)
    layer = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    layer = layer.to("cpu")
    x = torch.randn(4, 64)
    with torch.no_grad():
        trained = layer.train()(x)
        evaluated = layer.eval()(x)
        dequantized = layer.state.CB.float() * layer.state.SCB.float()[:, None] / 127
    torch.testing.assert_close(trained, x @ dequantized.t(), rtol=1e-6, atol=1e-6)
    assert (trained - evaluated).abs().max() > 1e-3

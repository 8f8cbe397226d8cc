"""`model.keep_dequantized`: the frozen 4-bit weights dequantized once and kept compute the same training as
dequantizing them in every forward and backward (bit for bit on the CPU), and `auto` keeps them only where they fit."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import bitsandbytes as bnb
import pytest
import torch
from conftest import SHORT_FIT, TINY_MODEL
from safetensors.torch import load_file
from transformers import LlamaConfig

from qlora_lit import dequantized
from qlora_lit.cli import cli_main
from qlora_lit.dequantized import DequantizedLinear
from qlora_lit.errors import ConfigError
from qlora_lit.flops import matmul_weights
from qlora_lit.fsdp import QLoRAFSDPStrategy
from qlora_lit.memory import MicroBatch, fits_dequantized
from qlora_lit.model import QuantizationArgs
from qlora_lit.module import QLoRAModule


def configured(compute_dtype: str, keep: bool | str) -> QLoRAModule:
    module = QLoRAModule(TINY_MODEL, QuantizationArgs(compute_dtype=compute_dtype), keep_dequantized=keep)
    torch.manual_seed(0)  # LoRA A is drawn from the seed
    module.configure_model()
    return module.train()


def weight_bytes(model: torch.nn.Module, kind: type) -> int:
    return sum(m.weight.nbytes for m in model.modules() if isinstance(m, kind))


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_kept_weights_train_exactly_as_the_4bit_layers(compute_dtype):
    ids = torch.randint(3, 2000, (2, 24), generator=torch.Generator().manual_seed(0))
    grads = []
    for keep in (False, True):
        module = configured(compute_dtype, keep)
        four_bit = weight_bytes(module.model, bnb.nn.Linear4bit)
        extra = dequantized.extra_bytes(module.model) if not keep else None
        torch.manual_seed(1)  # the same LoRA dropout masks
        loss = module.model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append({name: p.grad for name, p in module.model.named_parameters() if p.requires_grad})
        if keep:
            assert four_bit == 0 and weight_bytes(module.model, DequantizedLinear) > 0
        else:  # the estimate `auto` decides by is what the replacement adds
            counted = matmul_weights(module.model)
            replaced = dequantized.replace_four_bit_layers(module.model)
            assert matmul_weights(module.model) == counted  # the FLOPs (MFU) stay the same
            assert replaced == 7 * module.model.config.num_hidden_layers
            assert weight_bytes(module.model, DequantizedLinear) - four_bit == extra > 0
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name, grad in grads[0].items():
        assert torch.equal(grad, grads[1][name]), name


def test_a_fit_keeping_the_weights_ends_with_the_same_adapter(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["qlora_lit"])
    adapters = []
    for keep in ("false", "true"):
        root = tmp_path / keep
        cli_main(
            [
                *SHORT_FIT,
                "--trainer.max_steps",
                "2",
                "--model.keep_dequantized",
                keep,
                "--trainer.logger.init_args.save_dir",
                str(root),
            ]
        )
        adapters.append(load_file(next(root.rglob("adapter/adapter_model.safetensors"))))
    assert adapters[0].keys() == adapters[1].keys()
    for name, tensor in adapters[0].items():
        assert torch.equal(tensor, adapters[1][name]), name


def test_auto_keeps_nothing_on_a_cpu():
    module = configured("float32", "auto")
    assert weight_bytes(module.model, DequantizedLinear) == 0 and weight_bytes(module.model, bnb.nn.Linear4bit) > 0


LLAMA_8B = LlamaConfig(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, vocab_size=128256
)


@pytest.mark.parametrize(
    ("gpu_gib", "tokens", "kept"),
    [(141, 4096, True), (80, 4096, True), (80, 8192, False), (48, 4096, False), (24, 2048, False)],
)
def test_auto_keeps_the_weights_where_they_fit_beside_the_activations(gpu_gib, tokens, kept):
    """The 8B shape: 5.7 GiB of 4-bit weights (measured) and 9.75 GiB more dequantized (its 6.98 B linear weights in
    bf16, less their 4-bit data); 4096 tokens of full logits kept need about 33 GiB."""
    weights = int((5.7 + 9.75) * 2**30)
    assert fits_dequantized(LLAMA_8B, MicroBatch(1, tokens), 0, weights, gpu_gib * 2**30) is kept


def test_fsdp_refuses_keeping_the_weights_before_loading(monkeypatch):
    monkeypatch.setattr("qlora_lit.module.load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    fsdp_storage = QuantizationArgs(quant_storage="bfloat16")  # as fsdp.yaml stores the 4-bit weights
    module = QLoRAModule(TINY_MODEL, fsdp_storage, keep_dequantized=True, upcast_to_fp32=False)
    strategy = QLoRAFSDPStrategy(parallel_devices=[torch.device("cpu")] * 2)
    module._trainer = SimpleNamespace(strategy=strategy, precision="32-true", datamodule=None)
    with pytest.raises(ConfigError, match="keep_dequantized: true cannot be used under FSDP"):
        module.configure_model()


def test_auto_asks_the_gpu_and_the_data(monkeypatch):
    """The GPU branch of `auto`, run on the CPU with the GPU's answers given: the tiny model's dequantized weights and
    4096 tokens of activations need about 0.07 GiB beside 1 GiB already allocated."""
    module = configured("float32", "auto")
    monkeypatch.setattr(module, "micro_batch_tokens", lambda: 4096)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 2**30)
    cuda = torch.device("cuda")
    for gpu_gib, expected in ((16, True), (1.1, False)):
        properties = SimpleNamespace(total_memory=int(gpu_gib * 2**30))
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, p=properties: p)
        assert module.dequantize_for(module.model, cuda, checkpointing=False) is expected
    assert module.dequantize_for(module.model, cuda, checkpointing=True) is False  # memory is short: checkpointing
    monkeypatch.setattr(module, "micro_batch_tokens", lambda: None)
    assert module.dequantize_for(module.model, cuda, checkpointing=False) is False  # nothing to judge by
    monkeypatch.setattr(module, "micro_batch_tokens", lambda: 4096)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=16 * 2**30))
    assert module.dequantize_for(module.model, cuda, checkpointing=False) is True
    dequantized.replace_four_bit_layers(module.model)  # no 4-bit layer left (as with an 8-bit or unquantized base)
    assert module.dequantize_for(module.model, cuda, checkpointing=False) is False

"""The MFU formula on known shapes: Llama 3.1 8B, and the tiny model in 4 bits (logical, not packed, sizes)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MODEL
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from zoo import gemma3_with_vision_config, zoo_config

from qlora_lit.assets import resolve_asset
from qlora_lit.flops import LoraFlops, matmul_weights, peak_tflops
from qlora_lit.model import LoraArgs, QuantizationArgs, attach_lora, load_base_model

LLAMA_3_1_8B = LlamaConfig(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    tie_word_embeddings=False,
)


def test_llama_8b_frozen_base():
    with torch.device("meta"):  # shapes only, no memory
        model = LlamaForCausalLM(LLAMA_3_1_8B).requires_grad_(False)
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248  # the published parameter count
    flops = LoraFlops.of(model)
    # 32 layers x (q, o: 4096^2; k, v: 4096 x 1024 (8 KV heads); gate, up, down: 4096 x 14336) + head 128256 x 4096.
    # The input embedding is a lookup, not a matrix product.
    assert flops == LoraFlops(frozen_weights=7_504_658_432, trained_weights=0, layers=32, attention_width=4096)
    # A 512-token sequence: 4N per token, plus causal attention 6 * 32 layers * 4096 * 512 * 513.
    assert flops.per_sequence(512) == 512 * 4 * 7_504_658_432 + 6 * 32 * 4096 * 512 * 513
    # Attention per token grows with the sequence: +1.4% of 4N at 512 tokens, +10.7% at 4096.
    assert flops.per_sequence(4096) / 4096 == pytest.approx(4 * 7_504_658_432 * 1.107, rel=1e-3)


def test_sums_of_sequences_add_up():
    flops = LoraFlops(frozen_weights=1000, trained_weights=10, layers=2, attention_width=8)
    lengths = [3, 5, 7]
    pairs = sum(length * (length + 1) // 2 for length in lengths)
    assert flops.total(sum(lengths), pairs) == sum(flops.per_sequence(length) for length in lengths)
    assert flops.per_sequence(1) == 4 * 1000 + 6 * 10 + 12 * 2 * 8


def test_four_bit_layers_count_their_logical_size():
    plain = AutoModelForCausalLM.from_pretrained(resolve_asset(TINY_MODEL), dtype=torch.float32)
    expected = sum(m.in_features * m.out_features for m in plain.modules() if isinstance(m, torch.nn.Linear))
    quantized = load_base_model(TINY_MODEL, QuantizationArgs(compute_dtype="float32"))
    packed = sum(p.numel() for p in quantized.parameters())
    model = attach_lora(quantized, LoraArgs(r=8), gradient_checkpointing=False)
    frozen, trained = matmul_weights(model)
    assert frozen == expected
    assert packed < sum(p.numel() for p in plain.parameters())  # Params4bit.numel() would undercount
    assert trained == sum(p.numel() for p in model.parameters() if p.requires_grad)  # all LoRA weights are matmuls


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H200", 989.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA GeForce GTX 1080", None),
    ],
)
def test_peak_by_device_name(name, peak):
    assert peak_tflops(name) == peak


def test_a_mixture_of_experts_counts_the_experts_each_token_is_routed_to_and_its_router():
    """transformers 5 keeps experts in fused 3-D tensors and routes through a module that is no nn.Linear: MFU left
    both out (Qwen3-30B-A3B: 1.2 B of the 3.0 B weights a token goes through, MFU 2.5x too low)."""
    config = zoo_config("qwen3_moe")  # 4 experts, 2 per token, 2 layers
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config).requires_grad_(False)
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    layers, hidden, moe = config.num_hidden_layers, config.hidden_size, config.moe_intermediate_size
    experts = layers * config.num_experts_per_tok * (hidden * 2 * moe + moe * hidden)  # gate_up and down, per token
    router = layers * config.num_experts * hidden
    assert matmul_weights(model) == (linear + experts + router, 0)


def test_a_vision_tower_beside_the_language_model_is_not_counted():
    """Gemma 3 4B+ loads with its SigLIP tower and projector, which text training never runs (MFU 11-15% high)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(gemma3_with_vision_config()).requires_grad_(False)
    language = [model.model.language_model, model.lm_head]
    expected = sum(
        m.in_features * m.out_features for part in language for m in part.modules() if isinstance(m, torch.nn.Linear)
    )
    everything = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_weights(model) == (expected, 0) and everything > expected

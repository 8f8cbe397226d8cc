"""Tiny random-initialised models of the architectures users fine-tune, built from their transformers configs.

Each is two decoder layers of width 64 with the shipped tiny Llama's tokenizer: small enough for the
CPU test suite, yet every layer type, attention variant (grouped-query heads, sliding windows, soft-capping, biases)
and projection name of the real architecture is there. `bench/zoo_gpu.py` builds the same on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from qlora_lit.assets import resolve_asset

COMMON = {
    "vocab_size": 2112,  # the tiny Llama tokenizer's 2048 tokens and room for those a tokenizer class adds
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 1024,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": None,
}
# model_type -> what its real checkpoints (and the Korean models built on them) set beyond COMMON.
ZOO: dict[str, dict] = {
    "llama": {"tie_word_embeddings": True},  # Llama 3.2 1B/3B
    "llama-untied": {"model_type": "llama", "tie_word_embeddings": False},  # Llama 3.1 8B, SOLAR-style
    "qwen2": {"tie_word_embeddings": True},  # Qwen2.5 (q/k/v biases)
    "qwen3": {},  # Qwen3 (q/k norms)
    "mistral": {"sliding_window": 32},  # Mistral 7B v0.1's sliding window, made shorter than the examples
    "gemma2": {"sliding_window": 32},  # attention and final logit soft-capping, alternating sliding layers
    "gemma3_text": {"sliding_window": 32},  # sliding layers with another rope, q/k norms
    "exaone4": {"sliding_window": 32},  # EXAONE 4.0: hybrid sliding/global attention
    "gpt_neox": {},  # Polyglot-Ko: fused query_key_value, biases everywhere
    "phi3": {},  # fused qkv_proj and gate_up_proj
    "olmo2": {},
    "granite": {"logits_scaling": 8.0},  # Granite 3.x: logits divided by 8 after the head
    "smollm3": {},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
}


def zoo_config(name: str, **sizes):
    settings = {**COMMON, **sizes, **ZOO[name]}
    model_type = settings.pop("model_type", name)
    return AutoConfig.for_model(model_type, **settings)


def build_zoo_model(name: str, folder: Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16, **sizes) -> Path:
    """Save a random-initialised `name` model with the tiny Llama's tokenizer in `folder`; returns the folder."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(zoo_config(name, **sizes), dtype=dtype)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_asset("builtin:tiny-llama")).save_pretrained(folder)
    return folder


def gemma3_with_vision_config():
    """Gemma 3 as its 4B, 12B and 27B checkpoints load for causal LM training: the language model beside a SigLIP
    vision tower and a projector (Gemma3ForConditionalGeneration; only the 1B is text alone)."""
    from transformers import Gemma3Config

    text = {**COMMON, "sliding_window": 32}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision |= {"image_size": 28, "patch_size": 14}
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=2100)


def build_gemma3_with_vision(folder: Path, seed: int = 0) -> Path:
    """`gemma3_with_vision_config`'s model, random-initialised, with the tiny Llama's tokenizer in `folder`."""
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(gemma3_with_vision_config(), dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_asset("builtin:tiny-llama")).save_pretrained(folder)
    return folder

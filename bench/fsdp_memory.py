"""What FSDP-QLoRA needs per GPU, computed from a model's shape: the README's table of what fits where.

    python -m bench.fsdp_memory [--shapes llama-3.1-8b llama-3.1-70b] [--gpus 1 2 4 8] [--tokens 512]

Prints the need per GPU for each number of GPUs, then the fewest GPUs of common sizes each model needs, also with
FSDP's `cpu_offload` (each rank's shard of the base in CPU memory; one GPU means no FSDP, so no offload).

Per rank, as qlora_lit loads and trains (base.yaml + lowmem.yaml + fsdp.yaml): its shard of the packed 4-bit weights
and of the bf16 embeddings, head and norms; the 4-bit weights' quantization scales, which every rank keeps whole
(bitsandbytes holds them beside the layer, not as a parameter FSDP could shard); the largest gathered units (a decoder
layer and the next one prefetched, or a piece of the split output head or embeddings, qlora_lit/split_vocab.py);
the LoRA weights, gradients and 8-bit Adam state (whole on every rank); and the step's transients at `--tokens`
tokens per micro-batch: the checkpointed layer inputs, one layer's recomputed activations, a dequantized weight and
its gradient, one chunk of logits. Add about 0.5 GiB of CUDA context per GPU.
A model, not a measurement: bench/fsdp_capped.py measures, and docs/FSDP.md sets the two side by side.
"""

from __future__ import annotations

import argparse
import math

import bitsandbytes as bnb
import torch

from bench import shapes
from qlora_lit.model import LoraArgs, attach_lora
from qlora_lit.sharded_load import empty_model

GIB = 2**30
LOSS_CHUNK = 256  # bench/fsdp_capped.py's loss_chunk_tokens (lowmem.yaml's: 1024)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # base.yaml's


def per_rank_bytes(shape: str, gpus: int, tokens: int, lora_r: int, cpu_offload: bool = False) -> dict[str, float]:
    config = shapes.make_config(shape)
    settings = {"quant_type": "nf4", "double_quant": True, "storage": torch.bfloat16}
    base = empty_model(config, torch.bfloat16, "sdpa", settings)
    model = attach_lora(base, LoraArgs(r=lora_r, target_modules=TARGETS))
    packed = scales = plain = lora = 0
    for _, param in model.named_parameters():
        if isinstance(param, bnb.nn.Params4bit):
            packed += param.numel() * param.element_size()  # the empty model's 4-bit weights have their packed shape
            scales += param.numel() * param.element_size() * 2 // 64  # a byte per block of 64 (double quantization)
        elif param.requires_grad:
            lora += param.numel()
        else:
            plain += param.numel() * 2
    hidden, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    layer_packed = packed / layers
    head = config.vocab_size * hidden * 2
    if not config.tie_word_embeddings and head > layer_packed:  # split into pieces of a layer's size (split_vocab.py)
        head /= math.ceil(head / layer_packed)
    parts = {
        "sharded base": 0 if cpu_offload and gpus > 1 else (packed + plain) / gpus,  # offloaded: in CPU memory
        "scales (every rank)": scales,
        "gathered units": max(2 * layer_packed, head + layer_packed) if gpus > 1 else 0,
        "LoRA + grads + 8-bit Adam": lora * (4 + 4 + 2),  # whole on every rank
        "checkpointed activations": layers * tokens * hidden * 2,
        "one layer recomputed": tokens * (6 * hidden + 4 * inner) * 2,
        "dequantized weight + grad": 2 * hidden * inner * 2,
        "logits chunk": min(tokens, LOSS_CHUNK) * config.vocab_size * (2 + 4 + 4),
    }
    return {name: value / GIB for name, value in parts.items()}


CONTEXT_GIB = 0.5  # CUDA context, per GPU
# Capped runs (bench/fsdp_capped.py, docs/FSDP.md) against this model: 8B on four ranks 3.60 GiB per rank for 3.24
# computed (the head whole then), 70B on two 22.59 for 22.1, 8B on two more than 3.95 for 3.7 (out of memory at 4).
MEASURED_EXCESS = 1.1
CARDS = {  # what the cards report, in GiB
    "24 GB (RTX 3090/4090)": 23.99,
    "40 GB (A100 40GB)": 39.59,
    "48 GB (RTX A6000)": 47.99,
    "80 GB (H100 80GB)": 79.65,
}


def gpus_needed(
    shape: str, card_gib: float, tokens: int, lora_r: int, cpu_offload: bool = False, choices=(1, 2, 4, 8)
) -> int | None:
    """The fewest GPUs of `card_gib` on which the computed need per GPU, with the measured excess and the CUDA
    context, fits."""
    for gpus in choices:
        need = sum(per_rank_bytes(shape, gpus, tokens, lora_r, cpu_offload).values())
        if need * MEASURED_EXCESS + CONTEXT_GIB <= card_gib:
            return gpus
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["llama-3.1-8b", "llama-3.1-70b"])
    p.add_argument("--gpus", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--lora_r", type=int, default=4)
    a = p.parse_args()
    print("| model | GPUs | GiB per GPU (computed) | largest parts |")
    print("| --- | ---: | ---: | --- |")
    for shape in a.shapes:
        for gpus in a.gpus:
            parts = per_rank_bytes(shape, gpus, a.tokens, a.lora_r)
            top = sorted(parts.items(), key=lambda item: -item[1])[:3]
            described = ", ".join(f"{name} {value:.1f}" for name, value in top)
            print(f"| {shape} | {gpus} | {sum(parts.values()):.1f} | {described} |")
    print()
    print("| model | " + " | ".join(CARDS) + " |")
    print("| --- |" + " ---: |" * len(CARDS))
    for shape in a.shapes:
        rows = {name: [gpus_needed(shape, card, a.tokens, a.lora_r, offload) for card in CARDS.values()]
                for name, offload in ((shape, False), (f"{shape}, cpu_offload", True))}  # fmt: skip
        for name, needed in rows.items():
            if name == shape or needed != rows[shape]:  # the offload row where it changes something
                print(f"| {name} | " + " | ".join(str(n) if n else "more than 8" for n in needed) + " |")


if __name__ == "__main__":
    main()

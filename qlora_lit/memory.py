"""`model.gradient_checkpointing: auto`: recompute activations only when keeping them would not fit the GPU; and
`model.keep_dequantized: auto`: keep the 4-bit weights dequantized only when they fit beside the kept activations.

Kept activations grow with the tokens of a micro-batch. Per token, each decoder layer keeps about 14 x hidden +
4 x intermediate bf16 values (layer inputs, q/k/v, attention output, the MLP's gate/up/product, the LoRA inputs), and
the head keeps about 10 bytes per vocabulary entry (bf16 logits, their fp32 upcast and its gradient) unless the loss
is chunked. Calibrated on the Llama-3.1-8B shape on an H200 (docs/PERFORMANCE.md, `packed`): 4096 tokens per
micro-batch, compiled layers, the model's own loss over every position, measured 38.6 GiB peak with 5.7 GiB of
weights; this estimate gives 39. The loss now computes logits at labelled positions only, the cross-entropy
compiled on GPUs (loss.py): 4.5-7.9 GiB less at that shape with kept weights (2026-12-07 calls h, i), so the
estimate errs on the side of recomputing; not recalibrated yet.
"""

from __future__ import annotations

HEADROOM = 0.9  # of the GPU's memory: the allocator's fragmentation and the optimizer's buffers need the rest


def activation_bytes(config, tokens: int, loss_chunk_tokens: int) -> int:
    """Estimated activations kept for backward by one micro-batch of `tokens` tokens without checkpointing."""
    hidden, intermediate = config.hidden_size, config.intermediate_size
    per_layer = 2 * (14 * hidden + 4 * intermediate)
    logits_tokens = min(tokens, loss_chunk_tokens) if loss_chunk_tokens else tokens
    return tokens * config.num_hidden_layers * per_layer + logits_tokens * 10 * config.vocab_size


def needs_checkpointing(config, tokens: int, loss_chunk_tokens: int, weights_bytes: int, gpu_bytes: int) -> bool:
    return weights_bytes + activation_bytes(config, tokens, loss_chunk_tokens) > HEADROOM * gpu_bytes


def fits_dequantized(config, tokens: int, loss_chunk_tokens: int, weights_bytes: int, gpu_bytes: int) -> bool:
    """`weights_bytes` (with the dequantized weights) and the activations of `tokens` fit the GPU with room to spare."""
    return not needs_checkpointing(config, tokens, loss_chunk_tokens, weights_bytes, gpu_bytes)

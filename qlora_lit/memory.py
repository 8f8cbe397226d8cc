"""`model.gradient_checkpointing: auto`: recompute activations only when keeping them would not fit the GPU; and
`model.keep_dequantized: auto`: keep the 4-bit weights dequantized only when they fit beside the kept activations.

Kept activations grow with the tokens of a micro-batch. Per token, each decoder layer keeps about 14 x hidden +
4 x intermediate bf16 values (layer inputs, q/k/v, attention output, the MLP's gate/up/product, the LoRA inputs), and
the head keeps about 10 bytes per vocabulary entry (bf16 logits, their fp32 upcast and its gradient) unless the loss
is chunked. Calibrated on the Llama-3.1-8B shape on an H200 (docs/PERFORMANCE.md, `packed`): 4096 tokens per
micro-batch, compiled layers, the model's own loss over every position, measured 38.6 GiB peak with 5.7 GiB of
weights; this estimate gives 39. The loss now computes logits at labelled positions only, the cross-entropy
compiled on GPUs (loss.py): 4.5-7.9 GiB less at that shape with kept weights (2026-12-07 calls h, i), so the
estimate errs on the side of recomputing; not recalibrated yet. Eager attention (Gemma 2) also keeps each layer's
heads x width x width attention weights (8 bytes an entry, measured on the zoo's Gemma 2 on a CPU), and a model that
keeps its own loss (plain_head.py) keeps logits at every position whatever `loss_chunk_tokens` says.
"""

from __future__ import annotations

from dataclasses import dataclass

HEADROOM = 0.9  # of the GPU's memory: the allocator's fragmentation and the optimizer's buffers need the rest


EAGER_SCORE_BYTES = 8  # per head, query and key of a row, per layer, that eager attention keeps (scores, weights)


@dataclass(frozen=True)
class MicroBatch:
    """The largest micro-batch: `rows` of `width` tokens; how attention and the loss treat it."""

    rows: int
    width: int
    eager_attention: bool = False  # keeps every layer's rows x heads x width x width attention weights
    labelled_loss: bool = True  # logits at labelled positions (loss.py); False: the model's own loss, every position

    @property
    def tokens(self) -> int:
        return self.rows * self.width


def activation_bytes(config, batch: MicroBatch, loss_chunk_tokens: int) -> int:
    """Estimated activations kept for backward by one micro-batch without checkpointing."""
    text = config.get_text_config()  # a model beside a vision tower (Gemma 3 4B+) keeps its sizes there
    per_layer = 2 * (14 * text.hidden_size + 4 * text.intermediate_size)
    chunked = loss_chunk_tokens and batch.labelled_loss
    logits_tokens = min(batch.tokens, loss_chunk_tokens) if chunked else batch.tokens
    kept = batch.tokens * text.num_hidden_layers * per_layer + logits_tokens * 10 * text.vocab_size
    if batch.eager_attention:  # measured on the zoo's Gemma 2: 3.6x the rest at 1024 tokens, 6.1x at 2048
        heads = text.num_attention_heads
        kept += batch.rows * batch.width**2 * heads * text.num_hidden_layers * EAGER_SCORE_BYTES
    return kept


def needs_checkpointing(config, batch: MicroBatch, loss_chunk_tokens: int, weights_bytes: int, gpu_bytes: int) -> bool:
    return weights_bytes + activation_bytes(config, batch, loss_chunk_tokens) > HEADROOM * gpu_bytes


def fits_dequantized(config, batch: MicroBatch, loss_chunk_tokens: int, weights_bytes: int, gpu_bytes: int) -> bool:
    """`weights_bytes` (with the dequantized weights) and the activations of `batch` fit the GPU with room to spare."""
    return not needs_checkpointing(config, batch, loss_chunk_tokens, weights_bytes, gpu_bytes)

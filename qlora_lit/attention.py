"""`attn_implementation: varlen`: packed rows through torch's variable-length flash attention, no mask.

A packed row holds several examples whose position ids restart at 0. sdpa keeps them apart with a block-diagonal
mask of row x row entries and a kernel that still visits every masked block; torch's varlen kernel
(`torch.nn.attention.varlen`, FlashAttention on a GPU) takes the examples' start offsets instead and computes only
each example's own causal triangle. The module computes the offsets once per batch (`sequence_starts`) and passes
them as transformers' flash-attention keyword arguments (`cu_seq_lens_q`, `max_length_q`), which reach every
attention layer. Batches without them (padded batches, generation) take transformers' sdpa path with its mask.
On a CPU the same layout runs through sdpa one example at a time, so the reshaping is tested without a GPU.

Sliding-window layers (Mistral, Gemma 3, EXAONE 4) keep their window: a token sees itself and the `window - 1`
tokens before it, as transformers' masks do. Soft-capped attention (Gemma 2) is refused: neither path computes it.
The kernel takes fp16/bf16 only; other inputs (GPT-NeoX computes its rotary embeddings in fp32) go in as the
autocast dtype and come back in their own.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "varlen"
KERNEL_DEVICES = ("cuda",)  # where torch's varlen kernel runs; elsewhere the per-example reference computes it


def sequence_starts(position_ids: torch.Tensor) -> dict[str, torch.Tensor | int]:
    """Start offsets of the examples in the flattened batch (a new one wherever the position is 0), as the
    keyword arguments transformers passes down to attention."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().flatten()
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    longest = int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def causal_window_mask(length: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Which keys each query of one example sees: those at or before it, and (sliding window) less than `window`
    positions back."""
    q = torch.arange(length, device=device)[:, None]
    kv = torch.arange(length, device=device)[None, :]
    keep = kv <= q
    return keep & (kv > q - window) if window else keep


def _reference_varlen(q, k, v, cu: torch.Tensor, scale: float | None, window: int | None = None) -> torch.Tensor:
    """What the varlen kernel computes, one example at a time with sdpa (CPU; (tokens, heads, dim) layout)."""
    k, v = _repeat_heads(k, q.shape[1]), _repeat_heads(v, q.shape[1])
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        span = slice(start, end)
        mask = causal_window_mask(end - start, window, q.device)
        part = F.scaled_dot_product_attention(
            q[span].transpose(0, 1), k[span].transpose(0, 1), v[span].transpose(0, 1), attn_mask=mask, scale=scale
        )
        out[span] = part.transpose(0, 1)
    return out


def _kernel_varlen(q, k, v, cu: torch.Tensor, longest: int, scale: float | None, window: int | None = None):
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters  # torch 2.11 and 2.13 spell causality differently
    if "window_size" in params:
        options = {"window_size": (window - 1 if window else -1, 0)}
    elif window and longest > window:
        raise RuntimeError(
            f"this torch's varlen attention has no sliding window, and an example of {longest} tokens is longer than "
            f"the model's window of {window}: set model.attn_implementation to sdpa (or auto), or upgrade torch"
        )
    else:
        options = {"is_causal": True}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            options["enable_gqa"] = True
        else:
            k, v = _repeat_heads(k, q.shape[1]), _repeat_heads(v, q.shape[1])
    dtype = q.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
        q, k, v = q.to(half), k.to(half), v.to(half)
    return varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale, **options).to(dtype)


def _repeat_heads(kv: torch.Tensor, heads: int) -> torch.Tensor:
    """Grouped-query attention: each key/value head serves heads / kv_heads query heads."""
    return kv.repeat_interleave(heads // kv.shape[1], dim=1)


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function; query/key/value are (batch, heads, row, dim), the output (batch, row, heads,
    dim)."""
    if softcap:
        raise RuntimeError(
            f"{type(module).__name__} soft-caps its attention scores, which varlen attention cannot: set "
            "model.attn_implementation to auto, eager or flex_attention"
        )
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or dropout > 0.0:  # transformers' mask carries the sliding window here
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, sliding_window=sliding_window, **kwargs
        )
    batch, heads, row, dim = query.shape
    q = query.transpose(1, 2).reshape(batch * row, heads, dim)
    k = key.transpose(1, 2).reshape(batch * row, -1, dim)
    v = value.transpose(1, 2).reshape(batch * row, -1, dim)
    if query.device.type in KERNEL_DEVICES:
        out = _kernel_varlen(q, k, v, cu, kwargs["max_length_q"], scaling, sliding_window)
    else:
        out = _reference_varlen(q, k, v, cu, scaling, sliding_window)
    return out.reshape(batch, row, heads, dim), None


AttentionInterface.register(NAME, varlen_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)

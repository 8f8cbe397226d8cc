"""What a model's config says about the settings, checked before any weight is read.

Architectures differ in what they need: Gemma 2 soft-caps its attention scores (sdpa and varlen cannot), some
tokenizers have more tokens than the model has embedding rows, mixture-of-experts models keep their experts in fused
tensors that bitsandbytes leaves unquantized, hybrid models carry a recurrent state along the sequence (no packing),
and GPUs before Ampere have neither bf16 nor flash attention. Each is
found here from the config (and an empty copy of the model on the meta device), so a run stops in seconds with a
message naming what to change, not minutes later in the middle of the sanity check.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase

from qlora_lit.assets import resolve_asset
from qlora_lit.errors import ConfigError, not_found_message, remote_code_message

AMPERE = (8, 0)  # compute capability of the first GPUs with bf16 and flash attention (A100, RTX 30xx)
PRE_AMPERE_OVERRIDES = "--trainer.precision 16-mixed --model.quantization.compute_dtype float16"
FSDP_OVERRIDE = " --model.quantization.quant_storage float16"  # FSDP's units hold one dtype (configs/fsdp.yaml)


def model_config(name_or_path: str, trust_remote_code: bool = False) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(resolve_asset(name_or_path), trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ConfigError(not_found_message("model", name_or_path, err)) from err
    except ValueError as err:  # the model's own code would have to run; or a local folder without config.json
        if "trust_remote_code" in str(err):
            raise ConfigError(remote_code_message(name_or_path)) from err
        if Path(name_or_path).expanduser().exists():
            raise ConfigError(not_found_message("model", name_or_path, err)) from err
        raise


def attention_softcap(config: PretrainedConfig) -> float | None:
    """The cap on attention scores (tanh soft-capping) of architectures that have one (Gemma 2), else None."""
    return getattr(config.get_text_config(), "attn_logit_softcapping", None) or None


def sliding_window(config: PretrainedConfig) -> int | None:
    """The attention window of the architecture's sliding layers (Mistral, Gemma 2/3, EXAONE 4), else None."""
    text = config.get_text_config()
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return window if window and getattr(text, "use_sliding_window", True) else None


# transformers' layer types that carry a state along the sequence (Mamba, gated delta nets, short convolutions, and
# layers that add one of these to attention), and model types whose configs name no layer types but are recurrent.
RECURRENT_LAYER_TYPES = ("linear_attention", "mamba", "conv", "hybrid", "hybrid_sliding")
RECURRENT_MODEL_TYPES = ("rwkv", "xlstm")


def recurrent_layers(config: PretrainedConfig) -> list[str]:
    """The kinds of layers of this architecture that carry a state along the sequence, else an empty list."""
    text = config.get_text_config()
    kinds = {kind for kind in getattr(text, "layer_types", None) or () if kind in RECURRENT_LAYER_TYPES}
    if text.model_type in RECURRENT_MODEL_TYPES:
        kinds.add(text.model_type)
    return sorted(kinds)


def check_packing(config: PretrainedConfig, pack_length: int | None) -> None:
    """Packed rows keep their examples apart in attention only (a block mask, or varlen's sequence starts): a layer
    with a recurrent state or a convolution along the sequence would pass each example's state on to the next."""
    kinds = recurrent_layers(config)
    if pack_length and kinds:
        raise ConfigError(
            f"data.pack_length={pack_length} packs several examples into each row, which {config.model_type} cannot "
            f"keep apart: its {', '.join(kinds)} layers carry a state along the row (attention masks and sequence "
            "starts reach attention layers only), so every example would be trained on the ones before it. Set "
            "data.pack_length 0: padded batches, each example on its own"
        )


def varlen_has_window() -> bool:
    """Whether this torch's varlen kernel takes a sliding window (torch 2.13 does; older ones are causal only)."""
    from torch.nn.attention.varlen import varlen_attn

    return "window_size" in inspect.signature(varlen_attn).parameters


def gpu_capability(device: torch.device) -> tuple[int, int] | None:
    return tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None


def choose_attention(
    requested: str, config: PretrainedConfig, device: torch.device, longest_example: int | None = None
) -> str:
    """`auto` becomes the fastest attention that computes this architecture exactly on this device (and says
    which); an explicit choice that would compute another model, or cannot run here, is refused.
    `longest_example`: data.max_length, which decides whether a sliding window can bind at all."""
    softcap = attention_softcap(config)
    capability = gpu_capability(device)
    modern_gpu = capability is not None and capability >= AMPERE
    window = sliding_window(config)
    window_binds = window is not None and (longest_example is None or longest_example > window)
    if requested == "auto" and modern_gpu and window_binds and not softcap and not varlen_has_window():
        choice, why = "sdpa", f"its sliding window of {window} binds, and this torch's varlen kernel has none"
        rank_zero_info(f"model.attn_implementation auto: {choice} for {config.model_type} ({why})")
        return choice
    if requested == "auto":
        if softcap:  # flex_attention computes it too, but not inside compiled layers (torch 2.11's inductor fails)
            choice, why = "eager", f"it soft-caps attention scores at {softcap}, which sdpa and varlen cannot"
        elif modern_gpu:
            choice, why = "varlen", "packed rows through the flash kernel; padded batches and generation take sdpa"
        else:
            choice, why = "sdpa", "no flash kernel on " + ("this GPU" if capability else device.type)
        rank_zero_info(f"model.attn_implementation auto: {choice} for {config.model_type} ({why})")
        return choice
    if softcap and requested in ("sdpa", "varlen"):
        raise ConfigError(
            f"model.attn_implementation={requested} would train {config.model_type} without its attention "
            f"soft-capping ({softcap}), a different model than the checkpoint's: use auto, eager or flex_attention"
        )
    if capability is not None and not modern_gpu and requested in ("varlen", "flash_attention_2", "flex_attention"):
        raise ConfigError(
            f"model.attn_implementation={requested} needs an Ampere or newer GPU; "
            f"{torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}: use auto "
            "or sdpa"
        )
    return requested


def check_gpu_generation(device: torch.device, precision: str, compute_dtype: str, sharded: bool = False) -> None:
    """GPUs before Ampere (V100, T4) have no bf16: base.yaml's bf16 settings stop here, naming the overrides (under
    FSDP, `sharded`, the 4-bit weights' storage too: fsdp.yaml stores them as bf16).
    (torch's `is_bf16_supported()` says yes on them: it counts emulation, which is slow and not what QLoRA asks.)"""
    capability = gpu_capability(device)
    if capability is None or capability >= AMPERE:
        return
    bf16 = [f"trainer.precision={precision}"] if precision.startswith("bf16") else []
    bf16 += ["model.quantization.compute_dtype=bfloat16"] if compute_dtype == "bfloat16" else []
    if bf16:
        raise ConfigError(
            f"{torch.cuda.get_device_name(device)} (compute capability {capability[0]}.{capability[1]}) has no bf16, "
            f"which {' and '.join(bf16)} need: add {PRE_AMPERE_OVERRIDES}{FSDP_OVERRIDE if sharded else ''} "
            "(model.attn_implementation auto then takes sdpa)"
        )


def check_precision(precision: str, quantized: bool) -> None:
    """Trainer precisions that cast the whole model (bf16-true, ...) cannot apply to 4-bit or 8-bit weights."""
    if quantized and precision in ("bf16-true", "16-true", "64-true"):
        raise ConfigError(
            f"trainer.precision={precision} casts the whole model, which 4/8-bit weights cannot take; "
            "use bf16-mixed or 32-true (the 4-bit layers compute in quantization.compute_dtype either way)"
        )


def check_vocabulary(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, model_name: str) -> None:
    """A tokenizer with more tokens than the model's embedding matrix has rows fails at the first such token."""
    rows = config.get_text_config().vocab_size
    if rows is not None and len(tokenizer) > rows:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens, but {model_name!r} has embeddings for {rows}: token ids "
            f"{rows} and above would fail in the middle of training. Use the model's own tokenizer (leave "
            "data.tokenizer unset) or a model trained with this one"
        )


def expert_parameters(model: torch.nn.Module) -> int:
    """Parameters of fused mixture-of-experts weights (3-D tensors of experts x out x in): bitsandbytes quantizes
    linear layers only, so these stay in the compute dtype. Counted in the language model only (a vision tower's
    attention-pooling probe is 3-D too)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    return sum(param.numel() for param in decoder.parameters() if param.dim() == 3)


def describe_experts(model: torch.nn.Module, config: PretrainedConfig, compute_dtype: torch.dtype) -> str | None:
    """One line on what a mixture-of-experts model keeps unquantized and how much memory it takes, else None."""
    count = expert_parameters(model)
    if not count:
        return None
    size = count * torch.finfo(compute_dtype).bits / 8 / 2**30
    return (
        f"{config.model_type}: its experts are fused tensors that bitsandbytes does not quantize: {count:,} parameters "
        f"({size:.2f} GiB) stay in {str(compute_dtype).removeprefix('torch.')}; only the other linear layers are 4-bit"
    )

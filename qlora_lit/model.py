"""Build the trainable model: a causal LM with 4-bit (NF4) base weights and LoRA adapters.

No Lightning here: `build_qlora_model` is plain transformers + bitsandbytes + peft, usable from a notebook.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import bitsandbytes as bnb
import torch
from lightning.pytorch.utilities import rank_zero_info
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import ParamWrapper
from safetensors import SafetensorError
from torch.fx.experimental import _config as shapes_config
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from qlora_lit import attention  # noqa: F401 - registers attn_implementation "varlen" with transformers
from qlora_lit.assets import resolve_asset
from qlora_lit.cache import default_cache_dir
from qlora_lit.disk_space import write_problem
from qlora_lit.downloads import cut_short_files
from qlora_lit.dtypes import DTypeName, to_dtype
from qlora_lit.errors import ConfigError, not_found_message
from qlora_lit.preflight import choose_attention, expert_parameters, model_config

AttnImplementation = Literal["auto", "sdpa", "eager", "varlen", "flash_attention_2", "flex_attention"]
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "varlen", "flash_attention_2", "flex_attention")


@dataclass
class QuantizationArgs:
    """How the frozen base weights are stored (bitsandbytes)."""

    load_in_4bit: bool = True
    """Store the base model's linear layers in 4 bits (QLoRA)."""
    load_in_8bit: bool = False
    """Store them in 8 bits instead (LLM.int8). Exclusive with `load_in_4bit`."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type: NormalFloat4 (the QLoRA paper's) or plain FP4."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves about 0.4 bits per weight)."""
    compute_dtype: DTypeName = "bfloat16"
    """Dtype the 4-bit weights are dequantized to for the matrix products."""
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"
    """Container dtype of the packed 4-bit weights; set it to the compute dtype for FSDP."""

    def __post_init__(self) -> None:
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("quantization: load_in_4bit and load_in_8bit are both true; choose one")

    @property
    def enabled(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit

    def to_bnb_config(self) -> BitsAndBytesConfig | None:
        if self.load_in_8bit:
            return BitsAndBytesConfig(load_in_8bit=True)
        if not self.load_in_4bit:
            return None
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=to_dtype(self.compute_dtype),
            bnb_4bit_quant_storage=to_dtype(self.quant_storage),
        )


@dataclass
class LoraArgs:
    """The low-rank adapters that are trained (peft)."""

    r: int = 8
    """Rank of the update matrices: trainable parameters grow linearly with it."""
    alpha: float = 16.0
    """Scaling numerator: the update is multiplied by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapter input, in [0, 1)."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt (e.g. [q_proj, v_proj]) or "all-linear" for every linear layer but the output head."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases are trained along with the adapters; none with a 4-bit or 8-bit base (bitsandbytes casts those
    layers' biases in place to bf16/fp16 at every forward)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Extra modules trained in full (in fp32) and saved with the adapter (e.g. [lm_head])."""

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ConfigError(f"lora.r must be a positive integer, got {self.r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be a positive number, got {self.alpha} (0 would train nothing)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError('lora.target_modules is empty; list module names or use "all-linear"')

    def to_peft_config(self, exclude_modules: str | None = None) -> LoraConfig:
        return LoraConfig(
            exclude_modules=exclude_modules,
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            bias=self.bias,
            modules_to_save=self.modules_to_save or None,
            task_type="CAUSAL_LM",
        )


def load_base_model(
    name_or_path: str,
    quantization: QuantizationArgs,
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
    attn_implementation: AttnImplementation = "auto",
) -> PreTrainedModel:
    """Load the base causal LM onto one device, quantized if asked (never `device_map="auto"`: it breaks DDP).

    `attn_implementation`: every one of them keeps packed examples apart (see data/packing.py); `auto` takes the
    fastest that computes this architecture exactly on `device` (qlora_lit/preflight.py).
    """
    check_attn_implementation(attn_implementation)
    path = resolve_asset(name_or_path)
    config = model_config(name_or_path, trust_remote_code)  # a model with its own code stops here unless trusted
    if attn_implementation == "auto":
        attn_implementation = choose_attention("auto", config, torch.device(device))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            quantization_config=quantization.to_bnb_config(),
            dtype=to_dtype(quantization.compute_dtype),
            device_map={"": torch.device(device)},
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
        )
    except OSError as err:
        raise ConfigError(not_found_message("model", name_or_path, err)) from err
    except SafetensorError as err:  # a weights file cut short (a copy or download interrupted)
        cut = "; ".join(cut_short_files(Path(path))) if Path(path).is_dir() else ""
        again = (
            f": {cut} (a copy or download that did not finish). Copy or download it again, then run the same command"
        )
        raise ConfigError(
            f"could not load the model {name_or_path!r}: a weights file is damaged ({err}){again if cut else ''}"
        ) from err
    except (ImportError, ValueError) as err:  # transformers' "attention implementation not available here"
        if "attn_implementation" not in str(err) and "attention" not in str(err):
            raise
        raise ConfigError(
            f"model.attn_implementation={attn_implementation} cannot be used here: {err} (auto chooses one that can)"
        ) from err
    keep_training_layout(model)
    return model


def keep_training_layout(model: torch.nn.Module) -> int:
    """Keep every 4-bit layer in the one layout that training computes with, whatever the CPU; returns how many.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) converts a `Linear4bit`'s weight in place to a CPU inference layout
    (absmax in bf16, double quantization undone) at its first forward in eval mode without grad (a validation, a
    sample, generation) and keeps it: the frozen base then computes other logits (about 0.1 apart on the tiny model),
    and training forwards through a converted layer pass no gradient to its input. With the flag off, such a CPU
    computes exactly what every other CPU does.
    """
    layers = [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def check_attn_implementation(attn_implementation: str) -> None:
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(
            f"model.attn_implementation must be one of {list(ATTN_IMPLEMENTATIONS)}, got {attn_implementation!r}"
        )


def linear_layer_names(model: torch.nn.Module, with_head: bool = True) -> list[str]:
    """Short names of the linear layers LoRA can adapt (bitsandbytes layers subclass nn.Linear); `with_head=False`
    leaves the output head out, as all-linear does."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = None if with_head or get_head is None else get_head()
    linear = (
        name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and module is not head
    )
    return sorted({name.rsplit(".", 1)[-1] for name in linear})


def check_target_modules(model: torch.nn.Module, lora: LoraArgs) -> None:
    if isinstance(lora.target_modules, str):
        return
    available = linear_layer_names(model)
    missing = [name for name in lora.target_modules if name not in available]
    if not missing:
        return
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    advice = f"this {model_type} model has the linear layers {linear_layer_names(model, False)} (or use all-linear)"
    if expert_parameters(model):
        advice += (
            "; its experts are fused tensors, not linear layers: all-linear with lora.dropout 0 adapts them too "
            "(peft's target_parameters), the attention projections alone leave them frozen"
        )
    raise ConfigError(f"lora.target_modules {missing} are not linear layers of this model: {advice}")


def empty_model(config, trust_remote_code: bool = False) -> PreTrainedModel:
    """The model without weights (meta device): its module tree and shapes, in about a second even at 70B."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def count_lora_parameters(name_or_path: str, lora: LoraArgs, trust_remote_code: bool = False) -> int:
    """Trainable parameters LoRA gives this model, counted on an empty copy (meta device): no weights are read, and
    the adapters are built empty too (peft makes them on the default device and moves them to the base layer's: at
    lora.r 1,000,000 that filled the memory for minutes). Settings peft cannot apply to this architecture, and a
    rank no adapted layer can use, stop here, before anything is loaded."""
    model = empty_model(model_config(name_or_path, trust_remote_code), trust_remote_code)
    check_target_modules(model, lora)
    try:
        with torch.device("meta"):
            adapted = get_peft_model(model, lora.to_peft_config(outside_the_language_model(model)))
    except ValueError as err:
        if "lora_dropout" in str(err):  # peft's ParamWrapper: LoRA on fused expert tensors
            raise ConfigError(
                f"lora: {err}. The mixture-of-experts weights of {name_or_path!r} are fused tensors, which peft adapts "
                "only without dropout: set lora.dropout 0, or list the attention projections alone in "
                "lora.target_modules (the experts then stay frozen)"
            ) from err
        raise ConfigError(f"lora settings cannot be applied to {name_or_path!r}: {err}") from err
    trainable = adapted.get_nb_trainable_parameters()[0]
    check_rank(adapted, lora.r, trainable)
    return trainable


def check_rank(model: PeftModel, r: int, trainable: int) -> None:
    """The update of an in -> out layer (B @ A) has rank at most min(in, out): above that, lora.r adds parameters,
    not anything the adapter can express. A rank no adapted layer can use is refused (one that only small layers
    cannot, such as a mixture-of-experts router with 8 outputs, is common and fine)."""
    layers = [
        (min(layer.in_features, layer.out_features), name, layer)
        for name, layer in model.named_modules()
        if isinstance(layer, LoraLayer) and isinstance(getattr(layer, "in_features", None), int)
    ]
    if not layers:
        return
    limit, name, layer = max(layers, key=lambda item: item[0])
    if r > limit:
        raise ConfigError(
            f"lora.r={r} is more than any adapted layer can use: the largest, {name.removeprefix('base_model.model.')},"
            f" maps {layer.in_features} -> {layer.out_features} features, so its update has rank {limit} at most, and "
            f"a larger rank only adds parameters ({trainable:,} trainable, {trainable * 4 / 2**30:.1f} GiB in fp32). "
            f"Use lora.r <= {limit}"
        )


def attach_lora(
    model: PreTrainedModel,
    lora: LoraArgs,
    gradient_checkpointing: bool = True,
    upcast_to_fp32: bool = True,
) -> PeftModel:
    """Prepare a (quantized) model for training and wrap it with LoRA adapters.

    Args:
        model: the loaded base model.
        lora: adapter settings.
        gradient_checkpointing: recompute activations in the backward pass (non-reentrant, so DDP works).
        upcast_to_fp32: cast the non-quantized parameters (norms, embeddings, head) to fp32 as
            `prepare_model_for_kbit_training` does. Costs speed and memory; off keeps them in the compute dtype.
    """
    check_target_modules(model, lora)
    is_quantized = getattr(model, "is_quantized", False)
    check_trained_biases(lora, is_quantized)
    if is_quantized and upcast_to_fp32:
        accepted = inspect.signature(prepare_model_for_kbit_training).parameters
        new_name = "activation_checkpointing_kwargs" in accepted  # peft 0.22's name; 0.21 knows only the old one
        kwargs = "activation_checkpointing_kwargs" if new_name else "gradient_checkpointing_kwargs"
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, **{kwargs: {"use_reentrant": False}}
        )
    else:
        for param in model.parameters():
            param.requires_grad_(False)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    model.config.use_cache = False
    peft_model = get_peft_model(model, lora.to_peft_config(outside_the_language_model(model)))
    trained_in_fp32(peft_model)
    for name, param in peft_model.named_parameters():
        if is_lora_a(name) and not param.is_meta:  # an empty (meta) model gets them as FSDP loads it
            param.data = lora_a_init(name, param, torch.initial_seed())
    peft_model.train()  # from_pretrained returns eval mode: LoRA dropout and checkpointing would be off
    return peft_model


def language_model_modules(model: torch.nn.Module) -> set[torch.nn.Module] | None:
    """The modules of a composite model's decoder and output head (Gemma 3 4B+: not its vision tower and projector);
    None for a plain causal LM, all of which is the language model."""
    if model.config.get_text_config() is model.config:
        return None
    kept = set(model.get_decoder().modules())
    head = model.get_output_embeddings()
    return kept | (set(head.modules()) if head is not None else set())


def outside_the_language_model(model: torch.nn.Module) -> str | None:
    """For a model that is more than a language model (Gemma 3 from 4B up loads with its vision tower), a pattern of
    the modules outside its decoder and output head, which LoRA leaves out: their names (q_proj, fc1) match the
    targets, but text never reaches them, so their adapters would get no gradient (DDP stops at such parameters)
    and only grow the adapter. None for a plain causal LM."""
    kept = language_model_modules(model)
    if kept is None:
        return None
    outside = []

    def walk(module: torch.nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            if child in kept:
                continue
            if any(part in kept for part in child.modules()):
                walk(child, f"{prefix}{name}.")
            else:
                outside.append(f"{prefix}{name}")

    walk(model, "")
    return rf"({'|'.join(map(re.escape, outside))})(\..*)?" if outside else None


def check_trained_biases(lora: LoraArgs, quantized: bool) -> None:
    """bitsandbytes' 4-bit and 8-bit layers cast their bias in place to the activations' dtype at every forward
    (`bias.data = bias.data.to(x.dtype)`): a trained bias of such a layer would train in bf16 (its small updates
    rounded away) or fp16 (the gradient scaler refuses fp16 gradients at the first step)."""
    if quantized and lora.bias != "none":
        raise ConfigError(
            f"lora.bias={lora.bias} would train the biases of the 4-bit (or 8-bit) layers, which bitsandbytes casts in "
            "place to bf16/fp16 at every forward pass, so they would not train in fp32. Use lora.bias none (QLoRA's "
            "setting), or an unquantized base (model.quantization.load_in_4bit false)"
        )


def trained_in_fp32(model: torch.nn.Module) -> int:
    """Cast every trained tensor to fp32 and return how many were not: peft upcasts the LoRA matrices only, while the
    copies `lora.modules_to_save` trains (and an unquantized base's trained biases) stay in the base's dtype, where
    an 8-bit Adam update smaller than bf16's resolution is lost and fp16 gradients stop the gradient scaler."""
    cast = [param for param in model.parameters() if param.requires_grad and param.dtype != torch.float32]
    for param in cast:
        param.data = param.data.float()
    return len(cast)


def is_lora_a(name: str) -> bool:
    return ".lora_A." in name


def lora_a_init(name: str, like: torch.Tensor, seed: int) -> torch.Tensor:
    """LoRA A as peft initialises it (Kaiming-uniform; B starts at zero), drawn from a stream of its own, seeded by
    the run's seed and the matrix's name: the same adapters whether the model is loaded whole or by FSDP one unit at
    a time, on any number of ranks, whatever else drew random numbers before."""
    generator = torch.Generator().manual_seed((seed + zlib.crc32(name.encode())) % 2**63)
    value = torch.empty(like.shape, dtype=like.dtype, device="cpu")  # Lightning may make the GPU the default device
    torch.nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=generator)
    return value.to(like.device)


def causal_lm(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model, under peft or not."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers (under peft or not): the modules transformers keeps whole when it splits a model
    across devices (`_no_split_modules`), whatever the architecture calls them (LlamaDecoderLayer, GPTNeoXLayer)."""
    base = causal_lm(model)
    classes = set(getattr(base, "_no_split_modules", None) or [])
    return [module for module in base.modules() if type(module).__name__ in classes]


COMPILE_OPTIONS = {"shape_padding": False}  # Inductor settings of the compiled decoder layers


def compile_decoder_layers(model: PeftModel) -> None:
    """torch.compile every decoder layer in place (regional compilation: the layers share one compiled graph, and
    parameter names stay as they are). Shapes are dynamic: batches differ in length.

    A row as long as the hidden size (a 4096-token pack at 8B, 2048 at 1B) must not fix the graphs to that length (the
    first shorter row would compile them again: 17-30 s at 8B, bench/results/raw/2026-12-07-h100-8b-512-*). Two things
    did: duck shaping (torch gives sizes of equal value one symbol, and the norm's weight fixes the hidden size), off
    here; and on GPUs, Inductor's matmul-padding pass, which in torch 2.11 compares the symbolic row length with the
    weights' sizes (`K > M`, `K > N` for the LoRA matrices) and so guards on it being exactly 4096. It is off for these
    layers: it should pad nothing here (the base matrices' sizes are multiples of 8; the rank-4 LoRA products are
    memory-bound, which the pass checks before it pads); 8B runs without it were no slower than earlier runs with it
    on other H100s (no same-call comparison: docs/PERFORMANCE.md).

    With gradient checkpointing, the layer's checkpointed forward is traced as one region, and the `kernels` package
    (a dependency of newer transformers) sets and restores a context variable in the decoder layer's forward: dynamo
    refused to trace that side effect inside a checkpointed region and ran the whole layer uncompiled. Restoring it
    is the only effect, so dynamo may leave it out of the backward's recomputation (a process-wide dynamo setting).

    Python floats (dropout rate, LoRA scale, norm epsilon) are specialised: dynamic compilation made them symbolic,
    then restarted its analysis of each graph to specialise them after all (the tracing twice: on the H100, 12-27 s
    of the first step's compile time were first attempts; measured gain on CPUs only). Symbolic, they also entered
    the graphs as 0-dim float64 tensors on the host, for which Inductor compiles C++ kernels even on a GPU, after
    probing the host CPU's instruction sets (a build and a new Python process per set, in every process that loads
    the graphs, from the cache or not).

    The compiled code is cached under the qlora_lit cache (torch's default is /tmp, which cluster nodes empty
    between jobs), so a resumed or repeated run loads it instead of compiling again; TORCHINDUCTOR_CACHE_DIR wins.
    """
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        folder = default_cache_dir() / "torchinductor"
        problem = write_problem(folder)
        if problem is None:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
        else:  # a read-only home: compiling works all the same, only the cache is lost with the temp folder
            warnings.warn(
                f"compiled code is cached in torch's temporary folder: {folder} cannot be written ({problem}). Set "
                "QLORA_LIT_CACHE or TORCHINDUCTOR_CACHE_DIR to a writable folder to keep it between jobs",
                stacklevel=2,
            )
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"model.compile: no decoder layers found in {type(causal_lm(model)).__name__}")
    shapes_config.use_duck_shape = False  # read when a graph is traced: every layer, every rank
    torch._dynamo.config.specialize_float = True
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for layer in layers:
        layer.compile(dynamic=True, options=COMPILE_OPTIONS)
    if any(isinstance(module, ParamWrapper) for layer in layers for module in layer.modules()):
        rank_zero_info(
            "model.compile: peft adapts the fused experts by registering a parametrization in every forward pass, "
            "which torch.compile cannot trace: the decoder layers holding them run uncompiled (eager speed)"
        )

"""FSDP wrapping for a 4-bit base with LoRA adapters (`configs/fsdp.yaml`).

FSDP shards the frozen base; the adapters stay out of it. Each decoder layer (and the untied embeddings and output head,
in pieces of a layer's size where larger: split_vocab.py) is a unit, which FSDP flattens into one buffer of one dtype:
the 4-bit weights are stored in the compute dtype (`quantization.quant_storage`) and nothing frozen is upcast
(`upcast_to_fp32: false`). The LoRA weights, a few MB to a few hundred MB, are FSDP's `ignored_states`: whole and in
fp32 on every rank, their gradients averaged by one all-reduce per optimizer step, as DDP does. Sharding them instead
makes every LoRA matrix a unit of its own (a unit cannot mix frozen and trained tensors without gradient buffers the
size of the base): 448 more units at 8B, each gathered twice and reduce-scattered every micro-batch
(bench/fsdp_units.py measures the cost).

`QLoRAFSDPStrategy` is Lightning's FSDPStrategy with that all-reduce, and checkpoints that suit a frozen base: the
adapters and the optimizer state as without FSDP (never the base), so a run can resume on another number of GPUs,
or without FSDP.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from peft import PeftModel, get_peft_model
from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
from torch.distributed.fsdp._common_utils import FSDP_WRAPPED_MODULE as FSDP_PREFIX
from torch.optim import Optimizer
from transformers import PreTrainedModel

from qlora_lit.ddp import watched_launcher
from qlora_lit.errors import ConfigError
from qlora_lit.model import LoraArgs, QuantizationArgs, causal_lm, decoder_layers, to_dtype
from qlora_lit.preflight import model_config
from qlora_lit.sharded_load import (
    SafetensorsCheckpoint,
    ShardedLoader,
    base_bytes,
    checkpoint_folder,
    describe,
    empty_model,
    fsdp_handles,
    missing_tensors,
    prequantized_settings,
)
from qlora_lit.split_vocab import SplitEmbedding, SplitHead, split_input_embeddings, split_output_head, tied

SHARDS_KEY = "fsdp_rank_states"  # optimizer state saved per rank by qlora_lit before adapters were replicated


def _own_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return list(module.parameters(recurse=False))


def qlora_wrap_policy(
    module: torch.nn.Module,
    recurse: bool,
    nonwrapped_numel: int,
    own_units: frozenset[int] = frozenset(),
    lora_units: bool = False,
) -> bool:
    """FSDP `auto_wrap_policy`: the modules in `own_units` (ids: `fsdp_units`, which QLoRAFSDPStrategy puts there).
    `lora_units`: also every leaf module whose parameters all train (the LoRA matrices), for adapters sharded rather
    than replicated (bench/fsdp_units.py compares the two)."""
    if recurse:
        return True
    if id(module) in own_units:
        return True
    own = _own_parameters(module)
    return lora_units and bool(own) and not list(module.children()) and all(param.requires_grad for param in own)


def fsdp_units(model: torch.nn.Module) -> frozenset[int]:
    """The modules FSDP wraps as units (ids): every decoder layer, and the input embeddings and the output head (or
    their pieces) unless they share their weight: at 70B each is 2 GB in bf16, and in the root unit both would stay
    gathered for the whole step (FSDP keeps the root's parameters gathered from forward to backward)."""
    layers = frozenset(map(id, decoder_layers(model)))
    base = causal_lm(model)
    embeddings, head = base.get_input_embeddings(), base.get_output_embeddings()
    if embeddings is None or head is None or tied(embeddings, head):
        return layers
    units = set(layers)
    for part in (embeddings, head):
        units |= set(map(id, part.pieces)) if isinstance(part, (SplitEmbedding, SplitHead)) else {id(part)}
    return frozenset(units)


def trained_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that train (the adapters): FSDP's `ignored_states`, replicated on every rank."""
    return [param for param in model.parameters() if param.requires_grad]


def unwrapped_name(name: str) -> str:
    """A parameter's or module's name with FSDP's wrapper segments removed: as the unwrapped model names it."""
    return name.replace(f"{FSDP_PREFIX}.", "")


@torch.no_grad()
def average_replicated_grads(root: torch.nn.Module) -> None:
    """Average the gradients of the trained parameters FSDP leaves whole on every rank (its `ignored_states`)
    across the ranks, in one all-reduce per dtype, as DDP does; FSDP reduces only what it shards. A parameter
    without a gradient on this rank counts as zero, so every rank takes part in the same collectives."""
    params = trained_parameters(root)
    world = torch.distributed.get_world_size()
    for dtype in sorted({param.dtype for param in params}, key=str):
        same = [param for param in params if param.dtype == dtype]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in same])
        torch.distributed.all_reduce(flat)
        flat /= world
        for param, averaged in zip(same, flat.split([param.numel() for param in same]), strict=True):
            param.grad = averaged.view_as(param)


@torch.no_grad()
def trained_state_dict(root: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors, whole (every rank holds them), on the CPU; the frozen base is never gathered."""
    return {unwrapped_name(n): p.detach().cpu().clone() for n, p in root.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trained_state_dict(root: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (as `trained_state_dict` returns it) into every rank's trained parameters."""
    for name, param in root.named_parameters():
        key = unwrapped_name(name)
        if not param.requires_grad:
            continue
        if key not in state or state[key].shape != param.shape:
            found = "missing" if key not in state else f"of shape {tuple(state[key].shape)}"
            raise ConfigError(
                f"the checkpoint does not match this model's adapters: {key} is {found}, the model's is "
                f"{tuple(param.shape)} (another model or LoRA setting?)"
            )
        param.copy_(state[key])


def save_gathered_adapter(model: PeftModel, weights: dict[str, torch.Tensor], folder: Path) -> None:
    """Write the adapter folder from gathered weights (`trained_state_dict`, without the module's `model.` prefix)
    as `model.save_pretrained` would. PEFT picks the adapter tensors by walking the model's modules, whose names the
    FSDP units change, so it walks an empty twin of the unwrapped model (meta device: no memory) instead."""
    base = model.get_base_model()
    with torch.device("meta"), torch.random.fork_rng(devices=[]):  # LoRA's initialisation draws random numbers
        twin = get_peft_model(type(base)(base.config), copy.deepcopy(model.peft_config[model.active_adapter]))
    twin.save_pretrained(folder, safe_serialization=True, state_dict=weights)


class QLoRAFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy for a frozen (4-bit) base with trained adapters.

    The base is sharded; the adapters are replicated (FSDP's `ignored_states`) and their gradients averaged before
    each optimizer step. Checkpoints hold the adapters and the optimizer state as without FSDP. FSDP needs GPUs and
    at least two processes: with one, torch runs it unsharded, which only adds overhead (and fails for tied
    embeddings).
    """

    loader: ShardedLoader | None = None
    checkpoint: SafetensorsCheckpoint | None = None

    def empty_base(
        self, name_or_path: str, quantization: QuantizationArgs, attn_implementation: str, trust_remote_code: bool
    ) -> PreTrainedModel | None:
        """The base model, empty (meta device), for FSDP to load one unit at a time (`load_while_wrapping`); None
        where each rank loads it whole before sharding, as it did before: an 8-bit base, or a checkpoint whose tensor
        names are not the model's (transformers converts some as it loads)."""
        if quantization.load_in_8bit:
            rank_zero_info("FSDP with an 8-bit base: each rank loads it whole before sharding (4-bit loads per unit)")
            return None
        config = model_config(name_or_path, trust_remote_code)
        prequantized = prequantized_settings(config)
        settings = None
        if prequantized is not None:
            settings = {"quant_type": prequantized["bnb_4bit_quant_type"]}
            settings["double_quant"] = prequantized["bnb_4bit_use_double_quant"]
        elif quantization.load_in_4bit:
            settings = {"quant_type": quantization.quant_type, "double_quant": quantization.double_quant}
        if settings is not None:
            settings["storage"] = to_dtype(quantization.quant_storage)
        dtype = to_dtype(quantization.compute_dtype)
        base = empty_model(config, dtype, attn_implementation, settings, trust_remote_code)
        checkpoint = SafetensorsCheckpoint(checkpoint_folder(name_or_path))
        missing = missing_tensors(base, checkpoint)
        if missing:
            rank_zero_info(
                f"FSDP: {name_or_path!r} stores tensors under other names than the model's (e.g. {missing[:2]}; "
                "transformers converts them as it loads): each rank loads the base whole before sharding"
            )
            return None
        self.checkpoint = checkpoint
        return base

    def load_while_wrapping(self, model: PeftModel) -> None:
        """Make FSDP fill `model` (the empty base of `empty_base`, with LoRA attached) unit by unit as it wraps it."""
        split_output_head(model)  # no rank gathers the whole head, nor the whole embeddings
        split_input_embeddings(model)
        self.loader = ShardedLoader(model, self.checkpoint, self.root_device, torch.initial_seed())
        self.loader.make_adapters()
        self.kwargs["param_init_fn"] = self.loader

    def bytes_per_rank(self, model: torch.nn.Module) -> int:
        return base_bytes(model) // self.world_size

    def setup(self, trainer) -> None:
        if self.kwargs.get("auto_wrap_policy") is qlora_wrap_policy:
            model = self.lightning_module.model
            if not decoder_layers(model):  # the whole base would be one unit, gathered whole: no point sharding it
                raise ConfigError(
                    f"FSDP: no decoder layers found in {type(causal_lm(model)).__name__} (transformers names them in "
                    "_no_split_modules, which this model leaves empty): leave configs/fsdp.yaml out"
                )
            units = fsdp_units(model)
            self.kwargs["auto_wrap_policy"] = functools.partial(qlora_wrap_policy, own_units=units)
        self.kwargs["ignored_states"] = trained_parameters(self.lightning_module)
        super().setup(trainer)
        if self.cpu_offload.offload_params:
            without_frozen_cpu_grads(self.model)
        if self.loader is not None:
            describe(self.loader, self.world_size)
            self.checkpoint.close()
            self.kwargs.pop("param_init_fn", None)
            self.loader = self.checkpoint = None

    def setup_environment(self) -> None:
        if self.num_nodes * self.num_processes < 2:
            raise ConfigError(
                "FSDP shards the model across processes, and this run has one (trainer.devices x trainer.num_nodes "
                "= 1): leave configs/fsdp.yaml out (the default strategy is faster on one GPU), or use more GPUs"
            )
        if self.root_device.type != "cuda":
            raise ConfigError(f"FSDP runs on GPUs only, this run is on {self.root_device.type}: use DDP there")
        super().setup_environment()

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        watched_launcher(self)  # a failing rank is named by qlora_lit.rank_watch, not killed without a word

    def lightning_module_state_dict(self) -> dict[str, torch.Tensor]:
        return trained_state_dict(self.model)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = self.broadcast(checkpoint_path)  # every rank reads the file rank 0 names
        return self.checkpoint_io.load_checkpoint(path, map_location="cpu", weights_only=weights_only)

    @property
    def lightning_restore_optimizer(self) -> bool:
        return True  # Lightning's FSDPStrategy loads optimizer state in load_checkpoint; here Lightning's loop does

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        load_trained_state_dict(self.model, checkpoint["state_dict"])

    @property
    def mixed_precision_config(self) -> MixedPrecision | None:
        """Lightning's for the precision, without casting buffers: FSDP would cast the rotary frequencies to bf16
        (positions hundreds of tokens in would turn by a different angle than in training without FSDP)."""
        config = super().mixed_precision_config
        return None if config is None else dataclasses.replace(config, buffer_dtype=None)

    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        def closure_then_average() -> Any:  # before clipping, which runs after the closure
            loss = closure()
            average_replicated_grads(self.model)
            return loss

        return super().optimizer_step(optimizer, closure_then_average, model, **kwargs)

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """The optimizer state as without FSDP: every rank's is the same (it updates the replicated adapters)."""
        return getattr(optimizer, "_optimizer", optimizer).state_dict()  # unwrap Lightning's LightningOptimizer

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        for optimizer, saved in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            if SHARDS_KEY in saved:
                raise ConfigError(SHARDED_STATE_MESSAGE)
            optimizer.load_state_dict(saved)


def without_frozen_cpu_grads(root: torch.nn.Module) -> None:
    """With `cpu_offload`, torch's FSDP keeps a pinned CPU gradient buffer the size of every unit's shard, trained or
    not (`FlatParamHandle.init_flat_param_attributes`, at the first forward): as much pinned memory again as the
    offloaded base. The base's units are frozen and never get a gradient, so theirs is replaced as it is made by
    zeros of its size that take one element (torch checks the buffer's size when it resets the gradients, and never
    writes a frozen unit's): the node pins the base once, give or take the pinned allocator's rounding and caching."""
    for handle in fsdp_handles(root):
        if not handle.flat_param.requires_grad:
            init = getattr(handle, "init_flat_param_attributes", None)
            if init is None:  # torch's private FlatParamHandle changed: run as torch does, and say what it costs
                rank_zero_warn(
                    "cpu_offload: this torch's FSDP has no FlatParamHandle.init_flat_param_attributes, so its frozen "
                    "units keep their pinned CPU gradient buffers: about the 4-bit base again in pinned memory"
                )
                return
            handle.init_flat_param_attributes = functools.partial(_init_without_cpu_grad, init)


def _init_without_cpu_grad(init: Callable[[], None]) -> None:
    init()
    flat_param = init.__self__.flat_param
    if getattr(flat_param, "_cpu_grad", None) is not None:  # of the shard's size, as torch checks, in one element
        flat_param._cpu_grad = flat_param._cpu_grad.new_zeros(1).expand(flat_param._cpu_grad.shape)


SHARDED_STATE_MESSAGE = (
    "this checkpoint was saved under FSDP by an earlier qlora_lit, which kept the optimizer state in per-rank shards "
    "of the adapters; it cannot be resumed: start a new run from its adapter"
)


def shards_the_model(strategy: Any) -> bool:
    """Whether the strategy is FSDP: each rank holds shards of the parameters (flat), not whole tensors."""
    return isinstance(strategy, FSDPStrategy)


def check_fsdp_strategy(strategy: Any, quantization: QuantizationArgs, lora: LoraArgs) -> None:
    """FSDP for a 4-bit base with adapters means QLoRAFSDPStrategy, not Lightning's own FSDPStrategy, the packed
    4-bit weights stored in the compute dtype (FSDP flattens a unit's tensors into one buffer of one dtype), and
    LoRA alone: the unit-by-unit loading makes the adapters only, so a module of `lora.modules_to_save` failed
    (a tied head: not in the checkpoint under its name; an untied one: a unit of two dtypes)."""
    if shards_the_model(strategy) and not isinstance(strategy, QLoRAFSDPStrategy):
        raise ConfigError(
            "trainer.strategy: for FSDP use qlora_lit.fsdp.QLoRAFSDPStrategy (configs/fsdp.yaml); Lightning's "
            "FSDPStrategy would gather the whole frozen base for every checkpoint and cannot save the 8-bit "
            "optimizer state"
        )
    storage, compute = quantization.quant_storage, quantization.compute_dtype
    if isinstance(strategy, QLoRAFSDPStrategy) and quantization.load_in_4bit and storage != compute:
        raise ConfigError(
            f"model.quantization.quant_storage={storage} under FSDP must be the compute dtype ({compute}): FSDP "
            f"flattens each layer's packed 4-bit weights with its {compute} norms into one buffer of one dtype. "
            f"Add --model.quantization.quant_storage {compute}"
        )
    if isinstance(strategy, QLoRAFSDPStrategy) and lora.modules_to_save:
        raise ConfigError(
            f"lora.modules_to_save {lora.modules_to_save} cannot be trained under FSDP (configs/fsdp.yaml), which "
            "loads and shards the base for LoRA's adapters only: train them without FSDP (the default strategy or "
            "ddp), or leave them out"
        )


def check_predict_strategy(strategy: Any) -> None:
    """`predict` runs unsharded: ranks that answer different prompts would wait forever for each other's shards."""
    if shards_the_model(strategy):
        raise ConfigError(
            "predict does not run under FSDP: leave configs/fsdp.yaml out (the default strategy or ddp); the "
            "4-bit base with its adapter fits one GPU whenever FSDP could load it"
        )


def clip_sharded_grad_norm(root: torch.nn.Module, max_norm: float | None, algorithm: str | None) -> bool:
    """Clip the gradients' norm when `root` is FSDP-wrapped and clipping is by norm; returns whether it did (else
    Lightning's own clipping applies). Lightning's FSDP precision refuses to clip by norm; the root FSDP module's
    clip_grad_norm_ takes the norm of what FSDP shards across the ranks (the frozen base: no gradients) and of what
    it leaves whole on every rank (the adapters, averaged by then)."""
    if not max_norm or algorithm == "value" or not isinstance(root, FullyShardedDataParallel):
        return False
    root.clip_grad_norm_(max_norm)
    return True

"""Load the base for FSDP so that no rank ever holds all of it: the reason FSDP-QLoRA exists.

Every rank builds the model empty (meta device: module tree and shapes, no memory), with bitsandbytes' 4-bit layers
in place of the linear layers, and attaches LoRA to it. The LoRA weights are made whole (every rank trains them);
FSDP then materialises the base one unit at a time (a decoder layer, the rest) through `ShardedLoader`, its
`param_init_fn`: the unit's tensors are read from the
safetensors files (memory-mapped, so only those bytes are read and the page cache is shared by the node's ranks),
quantized on this rank's device, and flattened and sharded by FSDP before the next unit is read. A rank's peak is
its shard of the base plus one unsharded unit; the CPU holds no more than the tensors being read.

Why this way (docs/FSDP.md): each rank reading its units itself needs no broadcast of the 4-bit quantization state
(which is not a parameter, so FSDP's `sync_module_states` would not send it), no CPU copy of the model on rank 0,
and no change to how FSDP1 shards and checkpoints today's runs. Checkpoints whose tensor names differ from the
model's (transformers converts some on load, e.g. mixture-of-experts weights) are loaded whole instead, with a note.
Pre-quantized folders (`*-bnb-4bit`: packed weights and their quantization state) are read the same way.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import bitsandbytes as bnb
import torch
from huggingface_hub import snapshot_download
from lightning.pytorch.utilities import rank_zero_info
from safetensors import safe_open
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from qlora_lit.assets import resolve_asset
from qlora_lit.downloads import unfinished_load
from qlora_lit.errors import ConfigError, not_found_message
from qlora_lit.model import causal_lm, is_lora_a, lora_a_init

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class SafetensorsCheckpoint:
    """The tensors of a model folder (one `model.safetensors` or an index of shards), read one at a time."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        if unfinished := unfinished_load("model", str(folder)):  # before any unit is built: named, not a traceback
            raise ConfigError(unfinished)
        index = folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise ConfigError(f"{index} is no safetensors index ({err!r}): copy or download it again") from err
            self.files = {key: folder / name for key, name in weight_map.items()}
            if missing := sorted({path.name for path in self.files.values() if not path.is_file()}):
                raise ConfigError(f"{index} names weights files that {folder} lacks: {', '.join(missing)}")
        elif (folder / SINGLE_NAME).is_file():
            with safe_open(folder / SINGLE_NAME, "pt") as handle:
                self.files = dict.fromkeys(handle.keys(), folder / SINGLE_NAME)
        else:
            raise ConfigError(f"{folder} has no {SINGLE_NAME} or {INDEX_NAME}: FSDP reads safetensors checkpoints")
        self._handles: dict[Path, object] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def read(self, key: str) -> torch.Tensor:
        return self._handle(key).get_tensor(key)

    def read_rows(self, key: str, start: int, end: int) -> torch.Tensor:
        """Rows `start:end` of a tensor, as safetensors slices it: a view into storage of the whole tensor's size."""
        return self._handle(key).get_slice(key)[start:end]

    def _handle(self, key: str):
        path = self.files[key]
        if path not in self._handles:
            self._handles[path] = safe_open(path, "pt")
        return self._handles[path]

    def close(self) -> None:
        self._handles.clear()


def checkpoint_folder(name_or_path: str) -> Path:
    """The local folder of a model: itself, a shipped one, or its hub snapshot (weights and configs only)."""
    local = Path(resolve_asset(name_or_path)).expanduser()
    if local.is_dir():
        return local
    try:
        return Path(snapshot_download(name_or_path, allow_patterns=["*.safetensors", "*.json"]))
    except Exception as err:  # huggingface_hub raises several kinds (offline, gated, not found)
        raise ConfigError(not_found_message("model", name_or_path, err)) from err


def prequantized_settings(config: PretrainedConfig) -> dict | None:
    """The bitsandbytes 4-bit settings a pre-quantized folder was saved with (its config's quantization_config)."""
    settings = getattr(config, "quantization_config", None)
    settings = settings.to_dict() if hasattr(settings, "to_dict") else settings
    if not settings or settings.get("quant_method") != "bitsandbytes":
        return None
    if not settings.get("load_in_4bit"):
        raise ConfigError("FSDP loads 4-bit pre-quantized folders only; this one is 8-bit: use its bf16 original")
    return settings


def quantize_linear_layers(model: PreTrainedModel, quant_type: str, double_quant: bool, storage: torch.dtype) -> None:
    """Put bitsandbytes' 4-bit layers in place of the linear layers (the output head stays, as transformers keeps it).
    The layers stay empty; `ShardedLoader` fills them."""
    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or child is head:
                continue
            layer = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=child.weight.dtype,
                compress_statistics=double_quant,
                quant_type=quant_type,
                quant_storage=storage,
                device="meta",
            )
            layer.support_avx512bf16_for_cpu = False  # see model.keep_training_layout
            # The packed shape and dtype a quantized weight has, so that counting parameters (peft: packed elements
            # times two times the container's size) and bytes gives what the loaded model will have.
            packed = torch.empty(packed_shape(child.weight.numel(), storage), dtype=storage, device="meta")
            settings = {"quant_type": quant_type, "compress_statistics": double_quant, "quant_storage": storage}
            layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, module=layer, **settings)
            setattr(parent, name, layer)
    model.is_loaded_in_4bit = True  # peft reads it to give 4-bit layers their LoRA variant


def packed_shape(elements: int, storage: torch.dtype) -> tuple[int, int]:
    """The shape bitsandbytes gives a weight of `elements` values packed two to a byte into `storage` elements."""
    return ((elements + 1) // (2 * storage.itemsize), 1)


def empty_model(
    config: PretrainedConfig,
    dtype: torch.dtype,
    attn_implementation: str,
    quantization: dict | None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """The model on the meta device, in `dtype`, its linear layers 4-bit (settings in `quantization`, or none)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
        )
    if quantization is not None:
        quantize_linear_layers(model, quantization["quant_type"], quantization["double_quant"], quantization["storage"])
    return model


def checkpoint_key(parameter_name: str) -> str:
    """A parameter's name in the PEFT-wrapped model as the base checkpoint spells it."""
    key = parameter_name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    return key.replace(".original_module.", ".").replace(".modules_to_save.default.", ".")


def missing_tensors(model: torch.nn.Module, checkpoint: SafetensorsCheckpoint) -> list[str]:
    """Base tensors of `model` (LoRA aside; the base or the PEFT model) that the checkpoint does not hold under the
    model's own names."""
    tied = set(getattr(causal_lm(model), "all_tied_weights_keys", {}) or {})
    names = [name for name, _ in model.named_parameters(remove_duplicate=False) if not is_lora(name)]
    names += [name for name, _ in model.named_buffers() if name.rsplit(".", 1)[-1] not in NON_PERSISTENT_BUFFERS]
    return [key for key in map(checkpoint_key, names) if key not in checkpoint and key not in tied]


NON_PERSISTENT_BUFFERS = ("inv_freq", "original_inv_freq")
PARAMS4BIT_SETTINGS = ("quant_type", "blocksize", "compress_statistics", "quant_storage")
QUANT_STATE_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")  # as bitsandbytes saves a 4-bit weight


PIECE = re.compile(r"\.pieces\.\d+\.")  # a split head's or embeddings' piece in a parameter name


def is_lora(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


class ShardedLoader:
    """FSDP's `param_init_fn`: fills one module's own tensors (meta until now) on `device`.

    Base weights come from the checkpoint (4-bit layers are quantized here, or unpacked when the folder is
    pre-quantized); LoRA A gets peft's default initialisation from a generator seeded per matrix, so every rank draws
    the same values; LoRA B starts at zero; buffers the checkpoint lacks (rotary frequencies) are computed by the
    model's own initialisation. Tied tensors stay tied. `peak_unsharded_bytes` records the most base bytes this loader
    had made that were not yet FSDP shards, at any call: the proof that no rank held the whole base.
    """

    def __init__(self, model: torch.nn.Module, checkpoint: SafetensorsCheckpoint, device: torch.device, seed: int):
        self.model = model
        self.checkpoint = checkpoint
        self.device = device
        self.seed = seed
        self.names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
        self.owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                self.owners.setdefault(id(param), []).append((module, name))
        self.made: list[torch.Tensor] = []
        self.started: float | None = None
        self.loaded_bytes = 0
        self.peak_unsharded_bytes = 0

    @torch.no_grad()
    def __call__(self, module: torch.nn.Module) -> None:
        self.started = self.started or time.perf_counter()
        prefix = self.names.get(id(module))
        if prefix is None:  # a wrapper around the model (the LightningModule): nothing of its own to load
            return
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                self.replace(param, self.parameter(module, f"{prefix}.{name}", param))
        computed = False
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:
                key = checkpoint_key(f"{prefix}.{name}")
                stored = key in self.checkpoint
                value = self.checkpoint.read(key) if stored else torch.empty(buffer.shape, dtype=buffer.dtype)
                module._buffers[name] = value.to(self.device, buffer.dtype)
                computed |= not stored
        if computed and not list(module.parameters(recurse=False)):
            causal_lm(self.model)._init_weights(module)  # rotary frequencies are computed, not stored
        self.peak_unsharded_bytes = max(self.peak_unsharded_bytes, self.unsharded_bytes())

    def make_adapters(self) -> None:
        """Make the trained tensors (the adapters) now, whole: FSDP leaves them to every rank (`ignored_states`)
        and materialises only the modules it shards."""
        for module in self.model.modules():
            if any(param.requires_grad for param in module.parameters(recurse=False)):
                self(module)

    def parameter(self, module: torch.nn.Module, name: str, meta: torch.nn.Parameter) -> torch.nn.Parameter:
        if is_lora(name):
            return torch.nn.Parameter(self.lora_init(name, meta), requires_grad=meta.requires_grad)
        rows = getattr(module, "vocab_rows", None)  # a piece of split_vocab.py: its rows of the checkpoint's tensor
        key = self.stored_key(PIECE.sub(".", name) if rows else name, meta)
        if rows:
            # A copy: safetensors' slice is a view into storage of the whole tensor's size, which a piece kept on
            # the CPU would otherwise hold on to.
            value = self.checkpoint.read_rows(key, *rows).to(self.device, meta.dtype, copy=True)
            param = torch.nn.Parameter(value, requires_grad=False)
        elif isinstance(meta, bnb.nn.Params4bit):
            param = self.quantized(module, key, meta)
        else:
            param = torch.nn.Parameter(self.checkpoint.read(key).to(self.device, meta.dtype), requires_grad=False)
        self.made.append(param)
        self.loaded_bytes += tensor_bytes(param)
        return param

    def stored_key(self, name: str, meta: torch.nn.Parameter) -> str:
        """The checkpoint's name for a parameter; a tied one (an output head sharing the embeddings) is stored once,
        under one of the names it has."""
        names = [checkpoint_key(name)]
        names += [checkpoint_key(f"{self.names[id(owner)]}.{attr}") for owner, attr in self.owners.get(id(meta), [])]
        return next((key for key in names if key in self.checkpoint), names[0])

    def quantized(self, module: torch.nn.Module, key: str, meta: bnb.nn.Params4bit) -> bnb.nn.Params4bit:
        """A 4-bit weight: quantized here from the checkpoint's weight, or as the checkpoint packed it."""
        if f"{key}.absmax" not in self.checkpoint:
            weight = self.checkpoint.read(key).to(self.device, module.compute_dtype or torch.float32)
            settings = {name: getattr(meta, name) for name in PARAMS4BIT_SETTINGS}
            return bnb.nn.Params4bit(weight, requires_grad=False, module=module, **settings).to(self.device)
        names = [f"{key}.{part}" for part in QUANT_STATE_PARTS] + [f"{key}.quant_state.bitsandbytes__{meta.quant_type}"]
        stats = {name[len(key) + 1 :]: self.checkpoint.read(name) for name in names if name in self.checkpoint}
        packed = self.checkpoint.read(key).reshape(-1).view(meta.quant_storage).reshape(-1, 1)  # the FSDP container
        return bnb.nn.Params4bit.from_prequantized(packed, stats, device=self.device, module=module)

    def lora_init(self, name: str, meta: torch.Tensor) -> torch.Tensor:
        if is_lora_a(name):
            return lora_a_init(name, torch.empty(meta.shape, dtype=meta.dtype, device=self.device), self.seed)
        return torch.zeros(meta.shape, dtype=meta.dtype, device=self.device)  # LoRA B

    def replace(self, meta: torch.nn.Parameter, param: torch.nn.Parameter) -> None:
        """Put `param` wherever `meta` was registered (tied weights share one tensor)."""
        for owner, name in self.owners.get(id(meta), []):
            owner._parameters[name] = param
        self.owners[id(param)] = self.owners.pop(id(meta), [])

    def unsharded_bytes(self) -> int:
        """Bytes of the base tensors made so far that are not views into an FSDP shard (FSDP has not sharded their
        unit yet)."""
        shards = {handle.flat_param.untyped_storage().data_ptr() for handle in fsdp_handles(self.model)}
        seen, total = set(), 0
        for tensor in self.made:
            storage = tensor.untyped_storage()
            if storage.data_ptr() in shards or storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return total


def fsdp_handles(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return [m._handle for m in model.modules() if isinstance(m, FullyShardedDataParallel) and m._handle is not None]


def tensor_bytes(param: torch.Tensor) -> int:
    quant_state = getattr(param, "quant_state", None)
    extra = quant_state.absmax.numel() * quant_state.absmax.element_size() if quant_state is not None else 0
    return param.numel() * param.element_size() + extra


def base_bytes(model: torch.nn.Module) -> int:
    """Bytes of the base model's tensors once loaded (4-bit weights packed two to a byte, with one byte of scale per
    block of 64), LoRA aside: computed on the empty model, whose 4-bit weights have their packed shapes."""
    total = 0
    for name, param in model.named_parameters():
        if isinstance(param, bnb.nn.Params4bit):
            packed = param.numel() * param.element_size()
            total += packed + packed * 2 // 64  # two weights a byte; a byte of scale per 64 weights
        elif not is_lora(name):
            total += param.numel() * param.element_size()
    return total


def materialize(model: torch.nn.Module, loader: ShardedLoader) -> None:
    """Fill every module at once, without FSDP (one process: tests, tools)."""
    for module in model.modules():
        loader(module)
    loader.checkpoint.close()


def describe(loader: ShardedLoader, world_size: int) -> None:
    rank_zero_info(
        f"FSDP sharded loading: each rank read and quantized {size(loader.loaded_bytes)} of base tensors one unit at a "
        f"time, holding at most {size(loader.peak_unsharded_bytes)} unsharded, and keeps 1/{world_size} of them "
        f"({time.perf_counter() - (loader.started or time.perf_counter()):.1f} s)"
    )


def size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"

"""A random-initialised model of a real shape, saved as a pre-quantized 4-bit folder, one module at a time.

    python -m bench.prequantized --shape llama-3.1-70b --out /tmp/llama-3.1-70b-bnb-4bit [--device cuda]

What transformers' `save_pretrained` writes for a bitsandbytes 4-bit model (NF4, double quantization: packed weights
with their quantization state; embeddings, norms and the head in bf16) and what users download as `*-bnb-4bit`
folders, built without the bf16 model ever existing: each module's weights are drawn on `--device`, quantized there,
appended to the current 5 GB shard and freed. For the 70B shape that is about 40 GB on disk, where the bf16 model
would be 140 GB. The folder also gets the stand-in tokenizer of shapes.py.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import bitsandbytes as bnb
import torch
from safetensors.torch import save_file
from transformers import BitsAndBytesConfig

from bench import shapes
from qlora_lit.sharded_load import INDEX_NAME, empty_model

SHARD_BYTES = 5 * 2**30
QUANTIZATION = BitsAndBytesConfig(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype="bfloat16"
)


def random_module_state(module: torch.nn.Module, prefix: str, generator: torch.Generator, device: str) -> dict:
    """The module's own tensors drawn at random (norms at one), quantized where the module is 4-bit, as saved."""
    metas = dict(module.named_parameters(recurse=False))
    for name, meta in metas.items():
        # The empty model's 4-bit weights have their packed shape; the weight to quantize has the layer's.
        shape = (module.out_features, module.in_features) if isinstance(meta, bnb.nn.Params4bit) else meta.shape
        value = torch.empty(shape, dtype=torch.bfloat16, device=device)
        value.fill_(1.0) if meta.dim() == 1 else value.normal_(0.0, 0.02, generator=generator)
        if isinstance(meta, bnb.nn.Params4bit):
            settings = {key: getattr(meta, key) for key in ("quant_type", "blocksize", "compress_statistics")}
            param = bnb.nn.Params4bit(value, requires_grad=False, module=module, **settings).to(device)
        else:
            param = torch.nn.Parameter(value, requires_grad=False)
        module._parameters[name] = param
    state: dict[str, torch.Tensor] = {}
    module._save_to_state_dict(state, prefix, keep_vars=False)
    state = {key: value.to("cpu", copy=True) for key, value in state.items()}
    module._parameters.update(metas)  # free it on the device
    if hasattr(module, "quant_state"):
        module.quant_state = None
    return state


def build(shape: str, out: Path, device: str, seed: int = 0) -> dict:
    start = time.perf_counter()
    config = shapes.make_config(shape)
    settings = {"quant_type": "nf4", "double_quant": True, "storage": torch.uint8}
    model = empty_model(config, torch.bfloat16, "sdpa", settings)
    generator = torch.Generator(device).manual_seed(seed)
    partial = out.with_name(out.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    weight_map, shard, shard_bytes, total = {}, {}, 0, 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, partial / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, shard_bytes = {}, 0

    for module_name, module in model.named_modules():
        if not list(module.parameters(recurse=False)):
            continue
        for key, value in random_module_state(module, f"{module_name}.", generator, device).items():
            shard[key] = value
            shard_bytes += value.numel() * value.element_size()
            total += value.numel() * value.element_size()
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    (partial / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.quantization_config = QUANTIZATION.to_dict()
    config.dtype = torch.bfloat16
    config.save_pretrained(partial)
    shapes.make_tokenizer().save_pretrained(partial)
    os.replace(partial, out)
    return {"shape": shape, "folder": str(out), "bytes": total, "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", required=True, choices=sorted(shapes.SHAPES))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = parser.parse_args()
    if a.out.exists():
        raise SystemExit(f"{a.out} exists; remove it first")
    print(json.dumps(build(a.shape, a.out, a.device)), flush=True)


if __name__ == "__main__":
    main()

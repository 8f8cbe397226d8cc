"""FSDP's cost per unit, without GPUs: two CPU ranks (gloo) train a model with the 8B shape's structure (32 decoder
layers, LoRA on the seven projections) but tiny widths, so the step time is FSDP's own work (hooks, collectives,
views) and hardly any arithmetic.

    python -m bench.fsdp_units [--layers 32] [--steps 10] [--out results.jsonl]

Three ways of holding the adapters, each timed over --steps steps after two warm-up steps:
- `ddp`: no FSDP; DistributedDataParallel over the LoRA weights (the 4-bit base whole on each rank);
- `lora-units`: each LoRA matrix an FSDP unit of its own inside its decoder layer's unit (Answer.AI's fsdp_qlora and
  PEFT's `fsdp_auto_wrap_policy` wrap them so);
- `lora-replicated`: the decoder layers are the only units; the LoRA weights are left out of FSDP (`ignored_states`),
  whole on every rank, their gradients averaged by one all-reduce per step.
Prints one JSON line per way: units, collectives per step, milliseconds per step.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
from transformers import AutoModelForCausalLM, LlamaConfig

from bench import common
from qlora_lit.fsdp import average_replicated_grads, fsdp_units, qlora_wrap_policy, trained_parameters
from qlora_lit.model import LoraArgs, QuantizationArgs, attach_lora, load_base_model

COLLECTIVES = ("all_gather", "all_gather_single", "all_gather_into_tensor", "reduce_scatter_single", "all_reduce")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_folder(folder: Path, layers: int) -> None:
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)


def counting(counter: Counter) -> None:
    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def counted(*args, _name=name, _original=original, **kwargs):
            counter[_name] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)


def worker(rank: int, folder: str, way: str, steps: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    quantization = QuantizationArgs(compute_dtype="bfloat16", quant_storage="bfloat16")
    base = load_base_model(folder, quantization, torch.device("cpu"))
    torch.manual_seed(0)
    model = attach_lora(base, LoraArgs(r=4, dropout=0.0, target_modules=TARGETS), False, False)
    units = 0
    if way == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        ignored = trained_parameters(model) if way == "lora-replicated" else None
        policy = functools.partial(qlora_wrap_policy, own_units=fsdp_units(model), lora_units=way == "lora-units")
        model = FullyShardedDataParallel(
            model, auto_wrap_policy=policy, device_id=torch.device("cpu"), use_orig_params=True,
            mixed_precision=MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16),
            ignored_states=ignored,
        )  # fmt: skip
        units = sum(isinstance(m, FullyShardedDataParallel) for m in model.modules())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 512, (1, 128), generator=torch.Generator().manual_seed(rank))
    counter: Counter = Counter()
    seconds = []
    for step in range(steps + 2):
        if step == 2:
            counting(counter)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if way == "lora-replicated":
            average_replicated_grads(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    if rank == 0:
        row = {"way": way, "fsdp_units": units, "collectives_per_step": {k: v / steps for k, v in counter.items()}}
        row["ms_per_step"] = round(1000 * sum(seconds[2:]) / steps, 1)
        with open(out, "a") as handle:
            handle.write(json.dumps(row) + "\n")
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--ways", nargs="+", default=["ddp", "lora-units", "lora-replicated"])
    p.add_argument("--out", default=None)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as work:
        folder, rows = Path(work) / "model", Path(work) / "rows.jsonl"
        build_folder(folder, a.layers)
        for index, way in enumerate(a.ways):
            mp.spawn(worker, (str(folder), way, a.steps, 29_500 + index, str(rows)), nprocs=2)
        for line in rows.read_text().splitlines():
            row = {**json.loads(line), "layers": a.layers, "torch": torch.__version__, "device": "cpu (gloo, 2 ranks)"}
            common.emit(row, a.out)


if __name__ == "__main__":
    main()

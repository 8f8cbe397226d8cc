"""Time one optimizer step over a model shape's LoRA tensors: bitsandbytes' 8-bit AdamW against qlora_lit's, which
updates tensors in whole blocks of 256 elements with one kernel and skips bitsandbytes' host wait after every tensor,
and check both make bit-identical updates.

    python -m bench.optimizer_step --shape llama-3.1-8b --r 4

Prints one JSON line: milliseconds per step for each (median of the timed steps) and whether the weights and the
optimizer state after all steps are identical.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import bitsandbytes as bnb
import torch

from bench import shapes
from qlora_lit.optim import AdamW8bit, PagedAdamW8bit


def lora_shapes(shape: str, r: int) -> list[tuple[int, int]]:
    """(out, in) of every LoRA A and B matrix on the seven projections of every layer."""
    c = shapes.SHAPES[shape]
    hidden, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    projections = [(q, hidden), (kv, hidden), (kv, hidden), (hidden, q), (inter, hidden), (inter, hidden)]
    projections.append((hidden, inter))
    return [m for _ in range(layers) for out, inp in projections for m in ((r, inp), (out, r))]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(optimizer_class, sizes, device, warmup: int, steps: int) -> tuple[list[float], list[torch.Tensor], list]:
    gen = torch.Generator(device).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, device=device) * 0.01) for s in sizes]
    optimizer = optimizer_class(params, lr=2e-4)
    times = []
    for step in range(warmup + steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, device=device) * 1e-3
        sync(device)
        start = time.perf_counter()
        optimizer.step()
        sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times, [p.detach() for p in params], [optimizer.state[p] for p in params]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3.1-8b", choices=sorted(shapes.SHAPES))
    p.add_argument("--r", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of the script (no host waits to skip there)")
    a = p.parse_args()
    sizes = lora_shapes(a.shape, a.r)
    line = {"shape": a.shape, "r": a.r, "tensors": len(sizes), "device": a.device}
    if a.device == "cuda":
        line["gpu"] = torch.cuda.get_device_name()
    pairs = {
        "paged_adamw_8bit": (bnb.optim.PagedAdamW8bit, PagedAdamW8bit),
        "adamw_8bit": (bnb.optim.AdamW8bit, AdamW8bit),
    }
    for name, (theirs, ours) in pairs.items():
        t_theirs, w_theirs, s_theirs = run(theirs, sizes, a.device, a.warmup, a.steps)
        t_ours, w_ours, s_ours = run(ours, sizes, a.device, a.warmup, a.steps)
        same_weights = all(torch.equal(x, y) for x, y in zip(w_theirs, w_ours, strict=True))
        same_state = all(
            all(torch.equal(v, y[k]) if isinstance(v, torch.Tensor) else v == y[k] for k, v in x.items())
            for x, y in zip(s_theirs, s_ours, strict=True)
        )
        line[name] = {
            "bitsandbytes_ms": round(1e3 * statistics.median(t_theirs), 2),
            "qlora_lit_ms": round(1e3 * statistics.median(t_ours), 2),
            "identical_weights": same_weights,
            "identical_state": same_state,
        }
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()

"""Benchmark qlora_lit's own training stack (QLoRAModule + EpochBatchSampler + PaddingCollator under a Lightning
Trainer) on the shared synthetic data and random-initialised model.

    python -m bench.run_qlora_lit --shape llama-3.1-8b --variant fast --out results.jsonl

Variants (every one trains on about 64 examples per optimizer step, like the baselines):
    walkthrough-settings  batch 2 x 32 accumulation, gradient checkpointing, fp32 upcast (the walkthrough's recipe,
                          with qlora_lit's correct masking and per-token loss)
    fast                  batch 8 x 8, length-grouped batches, no checkpointing, no fp32 upcast
    fast-b16              batch 16 x 4, length-grouped, no checkpointing, no fp32 upcast
    lowmem                batch 8 x 8, length-grouped, checkpointing, no fp32 upcast
    *-fullce              the same with the logits of all labelled positions at once (loss_chunk_tokens=0; rows
                          before 2026-12-07 i: the model's own loss over the logits of all positions)
    packed                examples packed into rows of <= 4096 tokens, 1 row x 4 accumulation (TRL's packed setting),
                          varlen attention, compiled decoder layers, no checkpointing, full logits
    packed-b2             the same with 2 rows x 2
    packed-nocompile      packed without torch.compile
    packed-lowmem         packed with checkpointing and the chunked loss
    base                  configs/base.yaml's execution settings: rows of <= 2048 tokens, 1 row x 8 accumulation (about
                          60 examples per step), varlen attention, compiled decoder layers, full logits, no fp32
                          upcast, gradient_checkpointing and keep_dequantized "auto" (decided by QLoRAModule; the
                          decisions are in the settings as gc_decided and keep_dequantized_decided; rows before
                          2026-12-07 d ran without kept weights)
    base-b2               base reaching the same examples per step with 2 rows per micro-batch x 4 (data.batch_size 2,
                          trainer.accumulate_grad_batches 4): 4096 tokens per micro-batch, like packed
    base-as-configured    base.yaml exactly: one 2048-token row (about 8 examples, the walkthrough's effective batch)
                          per optimizer step, so the optimizer steps after every micro-batch
    base-lowmem           base with lowmem.yaml over it (checkpointing, logits in chunks of 1024 tokens): lowmem.yaml at
                          the benchmark's examples per step
    lowmem-as-configured  base.yaml with lowmem.yaml over it, exactly (one 2048-token row per optimizer step)
    base-cli, base-b2-cli base and base-b2 with the callbacks `python -m qlora_lit fit` adds (TrainingMonitor,
                          PreemptionCheckpoint, qlora_lit's progress bar): what they cost per micro-batch
    packed-keep           packed with the 4-bit weights kept dequantized (model.keep_dequantized: true)
    *-graphs              the same with CUDA graphs over the compiled layers, every micro-batch of fixed shapes
                          (bench/cuda_graphs.py; an experiment)
    *-lgraphs             the same with each compiled layer's forward and backward recorded as CUDA graphs by
                          torch.cuda.make_graphed_callables after 3 optimizer steps, max_length as the longest
                          example (bench/layer_graphs.py; an experiment)
    base-as-configured-skip  base-as-configured with model.nonfinite_loss: skip, which waits for each forward pass
                          before its backward (as `stop` did before call g)
    base-as-configured-lgraphs-nocheck  base-as-configured-lgraphs without `stop`'s check of the step's losses, the
                          one read of a device value per step: what a check that does not wait could gain at most
    packed-keep-cdt       packed-keep with Inductor's coordinate-descent tuning of its Triton kernels (an experiment)
    packed-keep-autotune  packed-keep with Inductor choosing each product's kernel by timing (max_autotune_gemm;
                          an experiment)
    *-modelce             the same with the model's own loss over the logits of every position (eager
                          cross-entropy), what loss_chunk_tokens: 0 ran before 2026-12-07 i (rows of variants with
                          chunk 0 before then: this loss)
The timing is the baselines' (bench/common.py): real tokens of the timed optimizer steps over their wall time; compiled
variants warm up for 6 optimizer steps instead of 2 (the same number of steps is timed).
"""

from __future__ import annotations

import argparse
import os
import time
from types import SimpleNamespace

import lightning as L
import torch
from torch.utils.data import DataLoader

from bench import common
from bench import data as bench_data
from bench.cuda_graphs import CudaGraphLayers, StaticShapes
from bench.layer_graphs import GraphedLayers
from bench.step_trace import StepProfiler
from qlora_lit import model as qlora_model
from qlora_lit.data.collate import PaddingCollator, StepTaggedDataset, label_count
from qlora_lit.data.packing import PackedDataset, PackingCollator, pack_rows
from qlora_lit.data.sampler import EpochBatchSampler
from qlora_lit.model import LoraArgs, QuantizationArgs
from qlora_lit.module import QLoRAModule
from qlora_lit.monitor import TrainingMonitor
from qlora_lit.optim import OptimizerArgs
from qlora_lit.preemption import PreemptionCheckpoint
from qlora_lit.progress import LoggedMetricsBar

VARIANTS = {
    "walkthrough-settings": {"batch": 2, "accum": 32, "group": False, "gc": True, "upcast": True},
    "fast": {"batch": 8, "accum": 8, "group": True, "gc": False, "upcast": False},
    "fast-b16": {"batch": 16, "accum": 4, "group": True, "gc": False, "upcast": False},
    "lowmem": {"batch": 8, "accum": 8, "group": True, "gc": True, "upcast": False},
    "fast-fullce": {"batch": 8, "accum": 8, "group": True, "gc": False, "upcast": False, "chunk": 0},
    "fast-b16-fullce": {"batch": 16, "accum": 4, "group": True, "gc": False, "upcast": False, "chunk": 0},
}
PACKED = {"pack": 4096, "batch": 1, "accum": 4, "group": False, "gc": False, "upcast": False, "chunk": 0}
PACKED.update(attn="varlen", compile=True, warmup=6)  # compilation (and one recompile) fall in the first 3 steps
VARIANTS["packed"] = PACKED
VARIANTS["packed-b2"] = {**PACKED, "batch": 2, "accum": 2}
VARIANTS["packed-nocompile"] = {**PACKED, "compile": False, "warmup": 2}
VARIANTS["packed-lowmem"] = {**PACKED, "gc": True, "chunk": 1024}
VARIANTS["base"] = {**PACKED, "pack": 2048, "accum": 8, "gc": "auto", "keep": "auto"}
VARIANTS["base-b2"] = {**VARIANTS["base"], "batch": 2, "accum": 4}
VARIANTS["base-as-configured"] = {**VARIANTS["base"], "accum": 1}
VARIANTS["base-lowmem"] = {**VARIANTS["base"], "gc": True, "chunk": 1024}
VARIANTS["lowmem-as-configured"] = {**VARIANTS["base-lowmem"], "accum": 1}
VARIANTS["base-cli"] = {**VARIANTS["base"], "cli": True}
VARIANTS["base-b2-cli"] = {**VARIANTS["base-b2"], "cli": True}
VARIANTS["packed-keep"] = {**PACKED, "keep": True}
VARIANTS["packed-keep-graphs"] = {**VARIANTS["packed-keep"], "graphs": True}
VARIANTS["base-as-configured-graphs"] = {**VARIANTS["base-as-configured"], "graphs": True}
VARIANTS["packed-keep-lgraphs"] = {**VARIANTS["packed-keep"], "lgraphs": True}
VARIANTS["base-as-configured-lgraphs"] = {**VARIANTS["base-as-configured"], "lgraphs": True}
VARIANTS["base-as-configured-skip"] = {**VARIANTS["base-as-configured"], "nonfinite": "skip"}
VARIANTS["base-as-configured-lgraphs-nocheck"] = {**VARIANTS["base-as-configured-lgraphs"], "nocheck": True}
VARIANTS["packed-keep-cdt"] = {**VARIANTS["packed-keep"], "inductor": {"coordinate_descent_tuning": True}}
VARIANTS["packed-keep-autotune"] = {**VARIANTS["packed-keep"], "inductor": {"max_autotune_gemm": True}}
for _name in ("packed-keep", "base-as-configured"):
    VARIANTS[f"{_name}-modelce"] = {**VARIANTS[_name], "modelce": True}


class RowCounter(common.CountingCollator):
    """Counts packed rows from the rows themselves (before padding): documents start where positions restart."""

    def __call__(self, rows):
        batch = self.inner(rows)
        lens = []
        for row in rows:
            starts = [i for i, pos in enumerate(row["position_ids"]) if pos == 0] + [len(row["position_ids"])]
            lens += [end - start for start, end in zip(starts[:-1], starts[1:], strict=True)]
        self.queue.append((sum(lens), sum(s * (s + 1) // 2 for s in lens), len(lens)))
        return batch


class LightningStepTimer(L.Callback):
    """Adapts the baselines' HF-Trainer step timer to Lightning's hooks (one record per micro-batch)."""

    def __init__(
        self, counter: common.CountingCollator, warmup_steps: int, accumulate: int, max_seconds: float | None = None
    ) -> None:
        self.accumulate = accumulate
        self.timer = common.make_timing_callback(counter, warmup_steps, "cuda", max_seconds)

    def on_train_start(self, trainer, pl_module) -> None:
        self.timer.on_train_begin(None, None, None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % self.accumulate:
            self.timer.on_substep_end(None, None, None)
        else:
            self.timer.on_step_end(None, SimpleNamespace(global_step=trainer.global_step), None)
            if self.timer.stopped_by_time:
                trainer.should_stop = True


def compile_seconds(at_least: float = 0.5) -> dict[str, float]:
    """Where torch.compile spent the run's time (dynamo's own timers, summed over graphs), the parts of half a second
    or more: how much of the first steps is compiling."""
    from torch._dynamo.utils import compile_times

    names, seconds = compile_times(repr="csv", aggregate=True)
    timed = {name: round(float(value), 1) for name, value in zip(names, seconds, strict=True)}
    return {name: value for name, value in timed.items() if value >= at_least}


def warm_compile_pool(limit_s: float = 120.0) -> float | None:
    """Start Inductor's compile workers and wait until they take work; the seconds it took, None where Inductor
    compiles in this process only. An experiment (`--warm_compile_pool`): with the compile cache warm, loading the
    cached code took 40 s of the first step (docs/PERFORMANCE.md, calls d); workers ready beforehand did not shorten
    it (1B shape, one H100), so they were not the cause."""
    from torch._inductor import async_compile

    if async_compile.get_compile_threads() <= 1:
        return None
    start = time.perf_counter()
    async_compile.AsyncCompile.warm_pool()
    while not async_compile.AsyncCompile.use_process_pool() and time.perf_counter() - start < limit_s:
        time.sleep(0.1)
    return round(time.perf_counter() - start, 1)


CACHE_COUNTERS = {
    "inductor": ("fxgraph_cache_", "async_compile_", "triton_bundler_", "generated_module_"),
    "aot_autograd": ("autograd_cache_",),
}
"""torch's counters of where compiled code came from: graphs (FX graph and AOT autograd caches: hit, miss, bypass),
Triton kernels (`async_compile_cache_miss`: kernels handed to the compiler in this process; `triton_bundler_*`: kernels
restored from a cached graph's bundle, as files for Triton's cache or as ready launchers) and generated modules."""


def compile_cache() -> dict[str, int]:
    """`CACHE_COUNTERS` of this run: whether a repeated run paid compilation again, and where (a warm run spent 40 s
    loading cached code at 8B, calls d: the Triton counters say whether its kernels were compiled again)."""
    from torch._dynamo.utils import counters

    return {
        name: n
        for group, prefixes in CACHE_COUNTERS.items()
        for name, n in counters[group].items()
        if name.startswith(prefixes)
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_run_args(p)
    p.add_argument("--variant", default="fast", choices=sorted(VARIANTS))
    p.add_argument(
        "--profile_dir", default=None, help="profile the last warm-up optimizer step into this folder (step_trace.py)"
    )
    p.add_argument(
        "--warm_compile_pool",
        action="store_true",
        help="start Inductor's compile workers before training (an experiment)",
    )
    a = p.parse_args()
    if a.profile_dir and os.path.exists(a.profile_dir) and not os.path.isdir(a.profile_dir):
        p.error(f"--profile_dir {a.profile_dir} is a file; give a folder (it is created if missing)")
    v = VARIANTS[a.variant]
    static = v.get("graphs") or v.get("lgraphs")  # every micro-batch of the same shapes
    model_dir = common.default_model_dir(a.shape)
    rows = bench_data.load(common.default_data_dir(a.n_examples, a.max_length))
    pairs = zip(rows["input_ids"], rows["completion_mask"], strict=True)
    examples = [{"input_ids": ids, "trained_spans": [(mask.index(1), len(ids))]} for ids, mask in pairs]
    if "pack" in v:
        dataset = PackedDataset(examples, pack_rows([len(e["input_ids"]) for e in examples], v["pack"]))
        lengths, label_counts = dataset.lengths(), dataset.label_counts()
        counter = RowCounter(PackingCollator(pad_id=128001, pad_to_multiple_of=v["pack"] if static else 8))
    else:
        dataset = examples
        lengths, label_counts = [len(e["input_ids"]) for e in examples], [label_count(e) for e in examples]
        counter = common.CountingCollator(PaddingCollator(pad_id=128001))
    sampler = EpochBatchSampler(
        lengths, v["batch"], seed=0, group_by_length=v["group"], label_counts=label_counts, accumulate=v["accum"]
    )
    collate = counter
    if static:  # lgraphs: no example is longer than max_length; the padding is cut to that too
        longest = a.max_length if v.get("lgraphs") else None
        slots = v["pack"] // bench_data.MIN_LEN + (v["pack"] // longest if longest else 0) + 2
        collate = StaticShapes(counter, v["pack"], slots, longest)
    loader = DataLoader(StepTaggedDataset(dataset), batch_sampler=sampler, collate_fn=collate)
    on_gpu = a.device == "cuda"
    qlora_model.COMPILE_OPTIONS.update(v.get("inductor", {}))  # read when the layers are compiled
    module = QLoRAModule(
        model_dir,
        quantization=QuantizationArgs(compute_dtype="bfloat16" if on_gpu else "float32"),
        lora=LoraArgs(r=4, alpha=8, dropout=0.05, target_modules=list(common.LORA_TARGETS)),
        optimizer=OptimizerArgs(name="paged_adamw_8bit", lr=2e-4, warmup_steps=1, schedule="linear"),
        gradient_checkpointing=v["gc"],
        upcast_to_fp32=v["upcast"],
        loss_chunk_tokens=v.get("chunk", 4096),
        attn_implementation=v.get("attn", "sdpa"),
        compile=v.get("compile", False) and not v.get("graphs"),  # CudaGraphLayers compiles them
        keep_dequantized=v.get("keep", False),
        nonfinite_loss=v.get("nonfinite", "stop"),
    )
    if v.get("modelce"):
        module.labelled_loss = lambda: False  # the model's own forward and loss
    if v.get("nocheck"):
        module.stop_if_nonfinite = lambda losses: None  # no read of the losses before each update
    if "auto" in (v["gc"], v.get("keep")):
        # The CLI's LightningDataModule tells QLoRAModule the largest micro-batch (pack_length x batch_size, or
        # max_length x batch_size); the bench has none, and without it `auto` falls back to checkpointing on a GPU.
        # Give the module the same number base.yaml's data settings would, so it makes base.yaml's decision.
        widest = v.get("pack", a.max_length)
        module.micro_batch_tokens = lambda: widest * v["batch"]
    decided = {}
    checkpointing_for, dequantize_for = module.checkpointing_for, module.dequantize_for

    def record_checkpointing(*args):
        decided["gc"] = checkpointing_for(*args)
        return decided["gc"]

    def record_dequantizing(*args):
        decided["keep"] = dequantize_for(*args)
        return decided["keep"]

    module.checkpointing_for, module.dequantize_for = record_checkpointing, record_dequantizing
    warmup = v.get("warmup", a.warmup_steps)
    timer = LightningStepTimer(counter, warmup, v["accum"], a.max_seconds)
    callbacks = [timer]
    if v.get("graphs"):
        callbacks.append(CudaGraphLayers())
    layer_graphs = GraphedLayers(after_steps=3) if v.get("lgraphs") else None
    if layer_graphs:
        callbacks.append(layer_graphs)
    if v.get("cli"):
        callbacks += [TrainingMonitor(), PreemptionCheckpoint(), LoggedMetricsBar()]
    if a.profile_dir:  # first: its trace export then counts in the profiled warm-up step, not in the next one
        callbacks.insert(0, StepProfiler(warmup - 1, a.profile_dir, v["accum"]))
    trainer = L.Trainer(
        accelerator="gpu" if on_gpu else "cpu",
        devices=1,
        precision="bf16-mixed" if on_gpu else "32-true",
        max_steps=a.max_steps - a.warmup_steps + warmup,
        accumulate_grad_batches=v["accum"],
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=bool(v.get("cli")),
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=callbacks,
    )
    pool_seconds = warm_compile_pool() if a.warm_compile_pool else None
    trainer.fit(module, train_dataloaders=loader)
    settings = {
        **v,
        "lora": "r=4 alpha=8 dropout=0.05, 7 projections",
        "optim": "paged_adamw_8bit",
        "lr": 2e-4,
        "precision": "bf16-mixed",
        "loss": "per label token of the optimizer step, prompt masked",
        "logits": "every position (the model's own loss)" if v.get("modelce") else "labelled positions only",
        "attn_implementation": v.get("attn", "sdpa"),
        "torch_compile": "decoder layers" if v.get("compile") else "off",
        "gc_decided": decided.get("gc"),
        "keep_dequantized_decided": decided.get("keep"),
        "max_seconds": a.max_seconds,
        "compile_seconds": compile_seconds(),
        "compile_cache": compile_cache(),
        "compile_pool_warmed_seconds": pool_seconds,
    }
    if layer_graphs:
        graphs = layer_graphs.graphs
        settings["layer_graphs"] = {"replays": graphs.replays, "misses": graphs.misses, "longest": a.max_length}
    line = common.result_line("qlora_lit", a.variant, a.shape, a.max_length, timer.timer.result(), a.device, settings)
    common.emit(line, a.out)


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = True
    main()

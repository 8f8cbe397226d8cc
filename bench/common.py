"""What the benchmark's baseline runners share: NF4/LoRA configs, token counting, step timing, the
JSON result line, and the command-line arguments and model/data preparation of the runners. Not run directly;
see run_walkthrough.py, run_trl.py and run_qlora_lit.py.

Measurement: a wrapped data collator records, for every micro-batch it builds, the real
(non-padding) tokens and the per-document lengths (for attention FLOPs). The callback consumes
those records in order, one per micro-batch (`on_substep_end` / `on_step_end`), so each optimizer
step knows exactly which tokens it trained on, with no GPU sync in the count. At the end of each
optimizer step it synchronises the device and takes the time; the first `warmup_steps` optimizer
steps are excluded. tokens/s = real tokens of the timed steps / their wall time.
MFU = (4 * N * tokens + attention FLOPs) / time / peak, with N the total parameter count (8.03e9 for
the 8B shape, as issue 7 counts it; frozen base: forward 2N + input-gradient 2N, no weight
gradient), attention 12 * layers * (heads * head_dim) * s(s+1)/2 per document of length s
(causal, forward + backward), padding excluded.
Recomputation by gradient checkpointing is not counted (it is overhead, not useful work).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import time

import torch

from bench import data as bench_data
from bench import shapes

# Model folders and data live here (git-ignored), so a warm GPU machine keeps them between runs.
CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache")
TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
H200_BF16_PEAK_TFLOPS = 790.0  # measured dense bf16 matmul peak on the project's H200 (issue 7)


def test_helper(name: str):
    """A helper module of tests/ (zoo.py, runs.py), loaded from its path: tests/ is not a package."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(TESTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """The arguments every runner takes: model shape, data size, steps timed, device, where the JSON line goes."""
    parser.add_argument("--shape", default="llama-3.1-8b", choices=sorted(shapes.SHAPES))
    parser.add_argument("--n_examples", type=int, default=4096)
    parser.add_argument("--max_length", type=int, default=512, help="truncation length of the data")
    parser.add_argument("--max_steps", type=int, default=22, help="optimizer steps, warm-up included")
    parser.add_argument("--warmup_steps", type=int, default=2, help="optimizer steps left out of the timing")
    parser.add_argument(
        "--max_seconds",
        type=float,
        default=None,
        help="stop after the timed optimizer step that passes this many seconds of timing (the result says how many "
        "steps were timed); for slow runs inside a fixed time limit",
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", default=None, help="also append the JSON line to this file")


def baseline_parser(description: str) -> argparse.ArgumentParser:
    """`add_run_args` plus what both HF-Trainer baselines take: where the model and data are, the GPU's peak."""
    parser = argparse.ArgumentParser(description=description)
    add_run_args(parser)
    parser.add_argument("--model_dir", default=None, help="default bench/.cache/models/<shape>")
    parser.add_argument("--data", default=None, help="default bench/.cache/data/n<N>-l<max_length>")
    parser.add_argument("--peak_tflops", type=float, default=None)
    return parser


def default_model_dir(shape: str) -> str:
    return os.path.join(CACHE, "models", shape)


def default_data_dir(n_examples: int, max_length: int) -> str:
    return os.path.join(CACHE, "data", f"n{n_examples}-l{max_length}")


def prepare_model_and_data(args: argparse.Namespace) -> tuple[str, str]:
    """Build the model folder and (unless --data names one) the data on first use; return their paths."""
    model_dir = args.model_dir or default_model_dir(args.shape)
    data_dir = args.data or default_data_dir(args.n_examples, args.max_length)
    shapes.build_model_dir(args.shape, model_dir, args.device)
    if args.data is None:
        bench_data.build(data_dir, args.n_examples, args.max_length)
    if bench_data.meta(data_dir)["max_length"] != args.max_length:
        raise SystemExit(f"{data_dir} was built for another max_length")
    return model_dir, data_dir


def nf4_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def lora_config():
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.05,
        target_modules=list(LORA_TARGETS),
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )


def device_map(device: str) -> dict:
    return {"": 0 if device == "cuda" else device}


def _doc_lengths(batch) -> list[int]:
    if "attention_mask" in batch:
        return [int(x) for x in batch["attention_mask"].sum(dim=1).tolist() if x > 0]
    if "cu_seq_lens_q" in batch:  # TRL padding-free: one flattened row, boundaries given
        return [int(x) for x in batch["cu_seq_lens_q"].diff().tolist() if x > 0]
    if "position_ids" in batch:  # flattened row, documents restart at position 0
        pos = batch["position_ids"].reshape(-1)
        starts = (pos == 0).nonzero().flatten().tolist() + [pos.numel()]
        return [b - a for a, b in zip(starts[:-1], starts[1:], strict=False) if b > a]
    return [int(batch["input_ids"].shape[1])] * int(batch["input_ids"].shape[0])


class CountingCollator:
    """Wraps a data collator; queues (real_tokens, sum of s*(s+1)/2 over documents) per micro-batch."""

    def __init__(self, inner):
        self.inner = inner
        self.queue: collections.deque = collections.deque()

    def __call__(self, examples):
        batch = self.inner(examples)
        lens = _doc_lengths(batch)
        self.queue.append((sum(lens), sum(s * (s + 1) // 2 for s in lens), len(lens)))
        return batch


def make_timing_callback(counter: CountingCollator, warmup_steps: int, device: str, max_seconds: float | None = None):
    from transformers import TrainerCallback

    cuda = device.startswith("cuda") and torch.cuda.is_available()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.step_tok = self.step_att = self.step_docs = 0
            self.tokens = self.att = self.docs = 0
            self.t0 = self.t_last = None
            self.steps_timed = 0
            self.step_times: list[float] = []
            self.stopped_by_time = False
            self.step_tokens: list[int] = []
            self.t_prev = None

        def _take(self):
            tok, att, docs = counter.queue.popleft()
            self.step_tok += tok
            self.step_att += att
            self.step_docs += docs

        def on_train_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self.t_prev = time.perf_counter()
            if warmup_steps == 0:
                self.t0 = self.t_prev

        def on_substep_end(self, args, state, control, **kw):
            self._take()

        def on_step_end(self, args, state, control, **kw):
            self._take()
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            if state.global_step == warmup_steps:
                self.t0 = now
            elif state.global_step > warmup_steps:
                self.tokens += self.step_tok
                self.att += self.step_att
                self.docs += self.step_docs
                self.steps_timed += 1
                self.t_last = now
                if max_seconds is not None and now - self.t0 >= max_seconds:
                    self.stopped_by_time = True
                    if control is not None:
                        control.should_training_stop = True
            self.step_times.append(round(now - self.t_prev, 4))
            self.step_tokens.append(self.step_tok)
            self.t_prev = now
            self.step_tok = self.step_att = self.step_docs = 0

        def result(self) -> dict:
            secs = (self.t_last - self.t0) if self.steps_timed else float("nan")
            return {
                "tokens": self.tokens,
                "seconds": secs,
                "steps_timed": self.steps_timed,
                "attn_pairs": self.att,
                "docs": self.docs,
                "step_times_s": self.step_times,
                "step_tokens": self.step_tokens,
                "unconsumed_batches": len(counter.queue),
                "stopped_by_max_seconds": self.stopped_by_time,
            }

    return StepTimer()


def result_line(system, variant, shape, max_length, timer_res, device, settings, peak_tflops=None, extra=None) -> dict:
    c = shapes.SHAPES[shape]
    tok, secs = timer_res["tokens"], timer_res["seconds"]
    tps = tok / secs if timer_res["steps_timed"] and secs > 0 else float("nan")
    flops = (
        4 * shapes.n_params(shape)["total"] * tok
        + 12 * c["num_hidden_layers"] * c["num_attention_heads"] * c["head_dim"] * timer_res["attn_pairs"]
    )
    peak_tflops = peak_tflops or (H200_BF16_PEAK_TFLOPS if device.startswith("cuda") else None)
    mfu = flops / secs / (peak_tflops * 1e12) if peak_tflops and tps == tps else None
    mem = {}
    if device.startswith("cuda") and torch.cuda.is_available():
        mem = {
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
            "gpu": torch.cuda.get_device_name(),
        }
    else:
        mem = {"peak_mem_gib": None, "peak_reserved_gib": None, "gpu": None}
    out = {
        "system": system,
        "variant": variant,
        "model": shape,
        "max_length": max_length,
        "tokens_per_s": round(tps, 2) if tps == tps else None,
        "peak_mem_gib": round(mem["peak_mem_gib"], 3) if mem["peak_mem_gib"] is not None else None,
        "peak_reserved_gib": round(mem["peak_reserved_gib"], 3) if mem["peak_reserved_gib"] is not None else None,
        "mfu": round(mfu, 4) if mfu is not None else None,
        "steps_timed": timer_res["steps_timed"],
        "tokens_timed": tok,
        "seconds_timed": round(secs, 3) if secs == secs else None,
        "tokens_per_step": round(tok / timer_res["steps_timed"], 1) if timer_res["steps_timed"] else None,
        "examples_per_step": round(timer_res["docs"] / timer_res["steps_timed"], 2)
        if timer_res["steps_timed"]
        else None,
        "settings": settings,
        "env": {
            "gpu": mem["gpu"],
            "device": device,
            "peak_tflops": peak_tflops,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "call": os.environ.get("BENCH_CALL"),  # one id per device call: ratios are taken within one call
            **versions(),
        },
        "step_times_s": timer_res["step_times_s"],
        "step_tokens": timer_res["step_tokens"],
        "unconsumed_batches": timer_res.get("unconsumed_batches"),
        "stopped_by_max_seconds": timer_res.get("stopped_by_max_seconds", False),
    }
    if extra:
        out.update(extra)
    return out


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    v = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate", "datasets", "liger-kernel"):
        with contextlib.suppress(PackageNotFoundError):
            v[name] = version(name)
    return v


def emit_trainer_run(system: str, variant: str, args, timer, settings: dict, train_output) -> None:
    """`result_line` + `emit` for a run of HF's Trainer (the walkthrough's and TRL's), with its training loss."""
    extra = {"train_loss": round(train_output.training_loss, 4)}
    timing = timer.result()
    line = result_line(
        system, variant, args.shape, args.max_length, timing, args.device, settings, args.peak_tflops, extra
    )
    emit(line, args.out)


def emit(line: dict, out_path: str | None = None):
    s = json.dumps(line, default=str)
    if out_path:
        with open(out_path, "a") as f:
            f.write(s + "\n")
    print(s, flush=True)

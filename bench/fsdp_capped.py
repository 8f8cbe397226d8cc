"""FSDP-QLoRA on GPUs smaller than the 4-bit base: two ranks share one GPU, each capped below the whole base.

    python -m bench.fsdp_capped --model DIR --shape llama-3.1-70b --cap_gib 24 --out results.jsonl

DIR is a bf16 model folder (shapes.py) or a pre-quantized one (prequantized.py). The fit is the CLI itself:
base.yaml + lowmem.yaml + fsdp.yaml, on two ranks sharing cuda:0 over gloo (tests/fsdp_shared_gpu.py's strategy),
each rank's allocator capped at --cap_gib (`torch.cuda.set_per_process_memory_fraction`: as if each had a GPU of
that size), KoAlpaca-like rows of max_length 512 packed into 512-token rows (scaling.py's data). It trains --steps
optimizer steps and checkpoints, resumes that checkpoint for --resume_steps more, and the exported adapter is then
loaded onto the (empty) base in plain PEFT and compared with the last checkpoint. One JSON row goes to --out.
Not a speed measurement of FSDP itself: the collectives go through host memory (gloo, about 0.35 GiB/s a rank: minutes
a step at 70B), or with --gather shared the base's all-gathers go through GPU memory the ranks share
(tests/shared_gather.py), not NVLink. bench/fsdp_memory.py computes what each rank needs; with two ranks the 8B shape
needs more than 4 GiB (it ran out at the first backward on 2026-12-07, docs/FSDP.md), so its capped run takes four.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from bench import common, scaling

ROOT = Path(__file__).resolve().parents[1]
SHARED_GPU = ROOT / "tests" / "fsdp_shared_gpu.py"


def fit(a: argparse.Namespace, data: Path, run: str, max_steps: int, *extra: str) -> tuple[Path, str, float]:
    command = [sys.executable, str(SHARED_GPU), "fit", "--config", str(ROOT / "configs" / "base.yaml")]
    command += ["--config", str(ROOT / "configs" / "lowmem.yaml"), "--config", str(ROOT / "configs" / "fsdp.yaml")]
    overrides = {
        "trainer.strategy.class_path": "fsdp_shared_gpu.SharedGPUFSDPStrategy",
        "trainer.devices": 1,  # the strategy's two processes on cuda:0
        "model.model_name_or_path": a.model,
        "model.lora.r": a.lora_r,
        "model.loss_chunk_tokens": a.loss_chunk_tokens,
        "data.path": str(data),
        "data.max_length": 512,
        "data.pack_length": 512,
        "data.batch_size": 1,
        "data.val_size": 2,
        "trainer.max_steps": max_steps,
        "trainer.val_check_interval": a.steps,
        "trainer.log_every_n_steps": 2,
        "trainer.num_sanity_val_steps": 0,
        "trainer.enable_progress_bar": "false",
        "trainer.logger.init_args.save_dir": str(a.work_dir),
        "trainer.logger.init_args.name": "capped",
        "trainer.logger.init_args.version": "run",
        "samples.prompts": "[]",  # generation through gloo gathers would take minutes a token at 70B
        "monitor.peak_tflops": common.H200_BF16_PEAK_TFLOPS,
    }
    if a.cpu_offload:
        overrides["trainer.strategy.init_args.cpu_offload"] = "true"
    command += [item for key, value in overrides.items() for item in (f"--{key}", str(value))]
    command += list(extra)
    env = {**os.environ, "FSDP_RANK_CAP_GIB": str(a.cap_gib), "FSDP_SHARED_RANKS": str(a.ranks)}
    env["FSDP_SHARED_GATHER"] = a.gather
    env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    log_path = Path(a.work_dir) / f"{run}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    text = log_path.read_text()
    if code:
        failed = {"system": "qlora_lit", "variant": variant(a), "model": a.shape, "ranks": a.ranks}
        failed |= {
            "cap_gib": a.cap_gib,
            "failed_in": run,
            "exit_code": code,
            "error": last_error(text),
            "load_seconds": load_report(text)[1],
            "peak_mem_gib_per_rank": peaks(text),  # up to the failure
            "peak_pinned_cpu_gib_per_rank": pinned_peaks(text),
            "after_load": after_load(text),
        }
        with open(a.out, "a", encoding="utf-8") as out:  # a run that does not fit is a result too
            out.write(json.dumps({**failed, "date": datetime.date.today().isoformat()}) + "\n")
        raise SystemExit(f"{run} failed ({code}):\n{text[-3000:]}")
    return Path(a.work_dir) / "capped" / "run", text, seconds


def variant(a: argparse.Namespace) -> str:
    return "fsdp-capped-offload" if a.cpu_offload else "fsdp-capped"


def last_error(log: str) -> str | None:
    """The log's last line naming an error, from its start (for an out-of-memory: the error, what was asked for and
    what the process held; torch's advice follows)."""
    lines = [line for line in log.splitlines() if "Error" in line]
    return lines[-1][:600] if lines else None


def per_rank(log: str, pattern: str) -> list[float]:
    """A figure each rank printed, in rank order whatever order the ranks printed in: `pattern` matches the rank and
    the figure (the last line of a rank wins)."""
    found = {int(rank): float(value) for rank, value in re.findall(pattern, log)}
    return [found[rank] for rank in sorted(found)]


def peaks(log: str) -> list[float]:
    return per_rank(log, r"rank (\d+) peak_allocated_gib ([\d.]+)")


def pinned_peaks(log: str) -> list[float]:
    return per_rank(log, r"rank (\d+) .*?peak_pinned_gib ([\d.]+)")


def after_load(log: str) -> dict[str, list[float]]:
    """What each rank held on the GPU once loaded and sharded, and its peak up to then (the load's)."""
    return {
        "held_gib_per_rank": per_rank(log, r"rank (\d+) loaded: allocated_gib ([\d.]+)"),
        "peak_gib_per_rank": per_rank(log, r"rank (\d+) loaded: .*?load_peak_gib ([\d.]+)"),
    }


def load_report(log: str) -> tuple[float | None, float | None]:
    """The base's size per rank and the load time, from the loader's line."""
    match = re.search(r"read and quantized ([\d.]+) (GiB|MiB).*\(([\d.]+) s\)", log)
    if not match:
        return None, None
    size = float(match.group(1)) / (1024 if match.group(2) == "MiB" else 1)
    return size, float(match.group(3))


def adapter_in_plain_peft(model: str, adapter: Path, checkpoint: Path) -> bool:
    """The exported adapter is one plain PEFT loads onto the base (an empty base: names and shapes are what can go
    wrong; no key missing or unexpected), and its values are the last checkpoint's."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    peft_key = common.test_helper("runs").peft_key  # a checkpoint key as PEFT names it
    config = AutoConfig.from_pretrained(model)
    config.quantization_config = None
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    peft_model = get_peft_model(base, LoraConfig.from_pretrained(adapter))
    weights = load_file(adapter / "adapter_model.safetensors")
    with warnings.catch_warnings():  # copying into the empty base's meta tensors does nothing, and says so per tensor
        warnings.simplefilter("ignore")
        result = set_peft_model_state_dict(peft_model, weights)
    missing = [key for key in result.missing_keys if "lora_" in key]
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    same = saved.keys() and all(torch.equal(weights[peft_key(key)], value) for key, value in saved.items())
    return not result.unexpected_keys and not missing and len(weights) == len(saved) and bool(same)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--shape", required=True, help="the shape's name, for the results row")
    p.add_argument("--cap_gib", type=float, required=True)
    p.add_argument("--ranks", type=int, default=2, help="processes sharing the GPU")
    p.add_argument("--steps", type=int, default=9, help="optimizer steps before the checkpoint that is resumed")
    p.add_argument("--resume_steps", type=int, default=1)
    p.add_argument("--lora_r", type=int, default=4)
    p.add_argument("--loss_chunk_tokens", type=int, default=256)
    p.add_argument("--cpu_offload", action="store_true", help="each rank's shard of the base in CPU memory")
    p.add_argument(
        "--gather",
        choices=["gloo", "shared"],
        default="gloo",
        help="how the ranks gather the base's shards: gloo, or memory they share on the GPU (tests/shared_gather.py)",
    )
    p.add_argument("--work_dir", default="/tmp/fsdp_capped")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    Path(a.work_dir).mkdir(parents=True, exist_ok=True)
    data = scaling.write_text_data(Path(a.work_dir) / "data.jsonl", 2048, 512)
    run, log, seconds = fit(a, data, "fit", a.steps)
    last = run / "checkpoints" / "last.ckpt"
    run, resumed_log, resumed_seconds = fit(a, data, "resumed", a.steps + a.resume_steps, "--ckpt_path", str(last))
    measured = scaling.measured(run, window=2) if a.steps > 2 else {"tokens_per_s": None}
    base_gib, load_seconds = load_report(log)
    row = {
        "system": "qlora_lit",
        "variant": variant(a),
        "model": a.shape,
        "ranks": a.ranks,
        "cap_gib": a.cap_gib,
        "base_4bit_gib": base_gib,  # the whole 4-bit base, which each rank reads unit by unit
        "base_4bit_gib_per_rank_read": base_gib,
        "peak_mem_gib_per_rank": peaks(log),
        "peak_mem_gib_per_rank_resumed": peaks(resumed_log),
        "peak_pinned_cpu_gib_per_rank": pinned_peaks(log),
        "after_load": after_load(log),
        "load_seconds": load_seconds,
        "tokens_per_s": measured["tokens_per_s"],
        "steps": a.steps + a.resume_steps,
        "steps_before_resume": a.steps,
        "resumed": "resuming" in resumed_log.lower() or "Restored all states" in resumed_log,
        "adapter_loads_in_plain_peft": adapter_in_plain_peft(a.model, run / "adapter", last),
        "wall_seconds": [round(seconds, 1), round(resumed_seconds, 1)],
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": common.versions(),
        "settings": {
            "configs": "base.yaml + lowmem.yaml + fsdp.yaml",
            "cpu_offload": a.cpu_offload,
            "max_length": 512,
            "pack_length": 512,
            "batch_size_per_rank": 1,
            "lora_r": a.lora_r,
            "loss_chunk_tokens": a.loss_chunk_tokens,
            "samples": "off",
            "collectives": "gloo (the ranks share one GPU)"
            if a.gather == "gloo"
            else "the base's all-gathers through shared GPU memory (tests/shared_gather.py), the rest gloo",
            "tokens_per_s_from": "the resumed run's TensorBoard windows after the first",
        },
    }
    with open(a.out, "a", encoding="utf-8") as out:
        out.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

"""base.yaml, exactly as shipped, on every architecture of the test zoo, on a GPU: does it fit, and what does it say?

    python -m bench.zoo_gpu --out bench/results/2026-12-04-h200-zoo.jsonl [--names llama gemma2] [--jobs 7]

Each model is tests/zoo.py's architecture at a small GPU shape (4 layers of width 256, random weights: no hub here)
with the shipped tiny tokenizer. Each fit is `python -m qlora_lit fit --config configs/base.yaml` with the
model and the shipped KoAlpaca sample as the only real changes, and a short run: 8 optimizer steps, a validation
(with its sample generations through the compiled layers) every 4. The fits run `--jobs` at a time (compilation is
CPU-bound; the GPU has room). `--repeat` runs the named models a second time in the same cache folder, to see what
the compilation cache saves. Recorded per fit: exit status, wall time, the attention `auto` chose, the first
optimizer step's time, recompilations, warning lines, and the last lines of a failed run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import common

ROOT = Path(__file__).resolve().parents[1]
zoo = common.test_helper("zoo")  # the test suite's tiny architectures
GPU_SHAPE = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8}
GPU_SHAPE |= {"num_key_value_heads": 4, "head_dim": 32, "moe_intermediate_size": 256}
# Architectures without the walkthrough's projection names: base.yaml's list is refused there (with these names in
# the message), so they train on their own equivalents of the seven.
OWN_TARGETS = {
    "gpt_neox": "[query_key_value,dense,dense_h_to_4h,dense_4h_to_h]",
    "phi3": "[qkv_proj,o_proj,gate_up_proj,down_proj]",
}


def fit(name: str, model: Path, work: Path, run: str, max_steps: int) -> dict:
    command = [sys.executable, "-m", "qlora_lit", "fit", "--config", str(ROOT / "configs" / "base.yaml")]
    command += ["--model.model_name_or_path", str(model), "--data.path", "builtin:koalpaca_sample.jsonl"]
    command += ["--data.val_size", "16", "--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", "4"]
    command += ["--trainer.log_every_n_steps", "2", "--trainer.enable_progress_bar", "false"]
    command += ["--trainer.logger.init_args.save_dir", str(work / "runs"), "--trainer.logger.init_args.name", run]
    if name == "qwen3_moe":
        command += ["--model.lora.target_modules", "all-linear", "--model.lora.dropout", "0"]  # experts too
    command += ["--model.lora.target_modules", OWN_TARGETS[name]] if name in OWN_TARGETS else []
    env = {**os.environ, "QLORA_LIT_CACHE": str(work / "cache")}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=work)
    log = done.stdout + done.stderr
    (work / f"{run}.log").write_text(log)
    first = re.search(r"first optimizer step: ([\d.]+) s", log)
    attention = re.search(r"model\.attn_implementation auto: (\S+)", log)
    return {
        "model": name,
        "run": run,
        "rc": done.returncode,
        "wall_s": round(time.perf_counter() - start, 1),
        "attention": attention.group(1) if attention else None,
        "first_step_s": float(first.group(1)) if first else None,
        "recompile_lines": len(re.findall(r"recompile_limit|Recompiling", log)),
        "warning_lines": [line for line in log.splitlines() if "Warning" in line or "warn" in line.lower()][:20],
        "tail": log.splitlines()[-15:] if done.returncode else [],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", nargs="*", default=list(zoo.ZOO))
    parser.add_argument("--repeat", nargs="*", default=[], help="models fitted a second time with the cache warm")
    parser.add_argument("--jobs", type=int, default=7)
    parser.add_argument("--max_steps", type=int, default=8)
    parser.add_argument("--work_dir", default="/tmp/zoo_gpu")
    parser.add_argument("--out", required=True)
    a = parser.parse_args()
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    models = {name: zoo.build_zoo_model(name, work / "models" / name, **GPU_SHAPE) for name in a.names}
    with ThreadPoolExecutor(a.jobs) as pool:
        rows = list(pool.map(lambda name: fit(name, models[name], work, name, a.max_steps), a.names))
        rows += list(pool.map(lambda name: fit(name, models[name], work, f"{name}-again", a.max_steps), a.repeat))
    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    with open(a.out, "a", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps({**row, "gpu": gpu, "versions": versions, "shape": GPU_SHAPE}) + "\n")
            print(json.dumps({key: row[key] for key in ("model", "run", "rc", "wall_s", "attention", "first_step_s")}))


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# FSDP over NCCL on 2 GPUs with base.yaml + fsdp.yaml as the README gives them (gradient clipping included), on a
# model and data of your choice: 6 steps; the same again (GPU run-to-run noise); the same resumed from its step-3
# checkpoint. Prints one JSON line comparing their adapters, and each run's logged throughput, memory, grad norm.
#   PYTHON=python3 bash tests/fsdp_nccl_check.sh OUT_DIR MODEL_DIR DATA.jsonl
# (bench/scaling.py leaves a random-init 8B shape in bench/.cache/models/llama-3.1-8b and data in
# bench/.cache/scaling/text-n16384-l512.jsonl.) Not a speed measurement: no compile, 6 steps.
set -u
[ $# -eq 3 ] || { echo "usage: bash tests/fsdp_nccl_check.sh OUT_DIR MODEL_DIR DATA.jsonl" >&2; exit 2; }
OUT=$1 MODEL=$2 DATA=$3 WORK=${WORK:-/tmp/fsdp-nccl}; PYTHON=${PYTHON:-python}
mkdir -p "$OUT"; rm -rf "$WORK"
F="$PYTHON -m qlora_lit fit --config configs/base.yaml --config configs/fsdp.yaml --trainer.devices 2
 --model.model_name_or_path $MODEL --data.path $DATA --trainer.max_steps 6 --trainer.val_check_interval 3
 --trainer.limit_val_batches 2 --data.batch_size 2 --trainer.accumulate_grad_batches 2 --samples.prompts []
 --trainer.log_every_n_steps 3 --trainer.enable_progress_bar false --trainer.logger.init_args.save_dir $WORK"
for run in full again; do
  timeout 300 $F --trainer.logger.init_args.version $run > "$OUT/$run.log" 2>&1; echo "$run rc $?"
done
C=$(ls "$WORK"/base/full/checkpoints/step000003-*.ckpt | head -1)
timeout 300 $F --trainer.logger.init_args.version resumed --ckpt_path "$C" > "$OUT/resumed.log" 2>&1
echo "resumed rc $?"
(cd tests && WORK=$WORK $PYTHON - <<'PY'
import json, os, torch
from pathlib import Path
from runs import checkpoint_at, peft_key
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

work = Path(os.environ["WORK"]) / "base"
full = checkpoint_at(work / "full", 6)
final, start = full["state_dict"], checkpoint_at(work / "full", 3)["state_dict"]
exported = load_file(work / "full" / "adapter" / "adapter_model.safetensors")

def distance(a, b):  # largest element, and the norm relative to how far steps 4-6 moved the adapters
    moved = sum((final[k] - start[k]).double().square().sum() for k in final).sqrt()
    return {"max_abs": max((a[k] - b[k]).abs().max().item() for k in a),
            "norm_over_steps_4_6": (sum((a[k] - b[k]).double().square().sum() for k in a).sqrt() / moved).item()}

report = {"gpus": torch.cuda.device_count(), "tensors": len(final), "dtypes": sorted({str(v.dtype) for v in final.values()}),
          "optimizer_states": len(full["optimizer_states"][0]["state"]),
          "exported_equals_checkpoint": all(torch.equal(exported[peft_key(k)], v) for k, v in final.items()),
          "again_vs_full": distance(checkpoint_at(work / "again", 6)["state_dict"], final),
          "resumed_vs_full": distance(checkpoint_at(work / "resumed", 6)["state_dict"], final)}
for run in ("full", "again", "resumed"):
    events = EventAccumulator(str(work / run)); events.Reload()
    report[run] = {tag: [round(e.value, 4) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
                   if tag in ("throughput/tokens_per_s", "memory/peak_allocated_gib", "train/grad_norm", "train_loss")}
print(json.dumps(report))
PY
) 2>&1 | tee "$OUT/compare.json"

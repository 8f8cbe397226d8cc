#!/usr/bin/env bash
# Baseline half of the issue-7 benchmark: prepare model + data, then run named variants.
#
#   bash bench/run_baselines.sh SHAPE MAX_LENGTH OUT.jsonl VARIANT...
#   e.g. bash bench/run_baselines.sh llama-3.1-8b 512 "$OUT/baselines.jsonl" prep walkthrough trl-pack-nogc
#
# Variants: prep (build model folder + data only), walkthrough, trl-pad, trl-pad-liger,
# trl-pack, trl-pack-liger, trl-pack-nogc, trl-pack-nogc-liger, trl-pf-nogc, trl-pf-nogc-liger,
# and qlora_lit's own: qlit-<variant> with a variant of bench/run_qlora_lit.py (qlit-fast, qlit-lowmem, ...).
# Each run prints one JSON line and appends it to OUT.jsonl. Extra args for every runner: $BENCH_ARGS
# (e.g. BENCH_ARGS="--max_steps 12"); BENCH_DEVICE=cpu builds the model on the CPU. Each variant is a
# separate process (clean peak-memory stats).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}"  # the tools are modules of the bench package (python -m bench.X)
shape=$1; len=$2; out=$3; shift 3
py=${PYTHON:-python}
args=(--shape "$shape" --max_length "$len" --out "$out" ${BENCH_ARGS:-})
# One id for every row of this device call (set it once before several scripts of the same call); bench/report.py
# takes ratios only between rows of one call.
export BENCH_CALL="${BENCH_CALL:-$(date -u +%Y%m%dT%H%M%SZ)-$(hostname)-$$}"
status=0
for v in "$@"; do
  echo "=== $v ($shape, max_length $len) $(date -u +%H:%M:%S)" >&2
  case $v in
    prep) $py -m bench.shapes --shape "$shape" --model_dir "$here/.cache/models/$shape" --device "${BENCH_DEVICE:-cuda}" &&
          $py -m bench.data --out "$here/.cache/data/n4096-l$len" --n 4096 --max_length "$len" ;;
    walkthrough) $py -m bench.run_walkthrough "${args[@]}" ;;
    trl-pad) $py -m bench.run_trl "${args[@]}" --mode padding ;;
    trl-pad-liger) $py -m bench.run_trl "${args[@]}" --mode padding --liger ;;
    trl-pack) $py -m bench.run_trl "${args[@]}" --mode packing ;;
    trl-pack-liger) $py -m bench.run_trl "${args[@]}" --mode packing --liger ;;
    trl-pack-nogc) $py -m bench.run_trl "${args[@]}" --mode packing --no_gc ;;
    trl-pack-nogc-liger) $py -m bench.run_trl "${args[@]}" --mode packing --no_gc --liger ;;
    trl-pf-nogc) $py -m bench.run_trl "${args[@]}" --mode padding_free --no_gc ;;
    trl-pf-nogc-liger) $py -m bench.run_trl "${args[@]}" --mode padding_free --no_gc --liger ;;
    qlit-*) $py -m bench.run_qlora_lit "${args[@]}" --variant "${v#qlit-}" ;;
    *) echo "unknown variant $v" >&2; status=2; continue ;;
  esac
  rc=$?; [ $rc -ne 0 ] && { echo "=== $v failed (rc $rc)" >&2; status=1; }
done
exit $status

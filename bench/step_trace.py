"""Profile one optimizer step of a Lightning run with torch.profiler and say where its wall time went.

`StepProfiler(step, out_dir)` starts the profiler on the first micro-batch of optimizer step `step` and stops it
after that step's last micro-batch. It writes `out_dir/trace.json.gz` (chrome://tracing or Perfetto) and
`out_dir/summary.txt` (each rank of several into `out_dir/rank<N>/`): the profiled wall time, how much of it the GPU
spent running kernels (the union of kernel intervals) and its longest idle gaps, host synchronisations, and the
operators by self CPU time and by GPU time.
A GPU busy far below the wall time means the host is the bottleneck (kernel launches, Python, synchronisations).
"""

from __future__ import annotations

import gzip
import json
import os
import time

import lightning as L
import torch
from torch.profiler import ProfilerActivity, profile

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync")


def kernel_busy(events: list[dict]) -> tuple[float, list[tuple[float, float]], int]:
    """Seconds during which at least one kernel ran, the idle gaps between kernels (start offset, length; seconds,
    longest first), and the kernel count, from chrome-trace events (timestamps in microseconds)."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "kernel" and "dur" in e)
    busy, gaps = 0.0, []
    if not spans:
        return 0.0, [], 0
    start, end = spans[0]
    first = start
    for s, e in spans[1:]:
        if s > end:
            busy += end - start
            gaps.append(((end - first) / 1e6, (s - end) / 1e6))
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    return busy / 1e6, sorted(gaps, key=lambda g: -g[1]), len(spans)


def sync_calls(events: list[dict]) -> dict[str, tuple[int, float]]:
    """Count and total seconds of the CUDA runtime calls that can make the host wait."""
    found: dict[str, tuple[int, float]] = {}
    for e in events:
        if e.get("cat") == "cuda_runtime" and e.get("name") in SYNC_CALLS:
            n, t = found.get(e["name"], (0, 0.0))
            found[e["name"]] = (n + 1, t + e.get("dur", 0) / 1e6)
    return found


def summarize(trace: dict, wall_s: float, micro_batches: int) -> str:
    events = trace.get("traceEvents", [])
    busy, gaps, kernels = kernel_busy(events)
    long_gaps = [g for _, g in gaps if g > 1e-3]
    lines = [
        f"profiled: {micro_batches} micro-batches, {wall_s:.3f} s wall",
        f"GPU kernels: {kernels} ({kernels / max(micro_batches, 1):.0f} per micro-batch), busy {busy:.3f} s "
        f"({100 * busy / wall_s:.1f}% of the wall time)",
        "longest idle gaps between kernels (offset s, length s): "
        + ", ".join(f"({o:.3f}, {g:.4f})" for o, g in gaps[:10]),
        f"idle gaps over 1 ms: {len(long_gaps)}, totalling {sum(long_gaps):.3f} s",
    ]
    for name, (n, t) in sorted(sync_calls(events).items()):
        lines.append(f"{name}: {n} calls, {t:.4f} s")
    return "\n".join(lines)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepProfiler(L.Callback):
    def __init__(self, step: int, out_dir: str, accumulate: int) -> None:
        self.step, self.out_dir, self.accumulate = step, out_dir, accumulate
        self.prof: profile | None = None
        self.micro_batches = 0
        self.t0 = 0.0
        self.done = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.done or self.prof is not None or trainer.global_step != self.step or batch_idx % self.accumulate:
            return
        sync()
        cuda = [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
        self.prof = profile(activities=[ProfilerActivity.CPU, *cuda])
        self.prof.start()
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.prof is None:
            return
        self.micro_batches += 1
        if self.micro_batches < self.accumulate:
            return
        sync()
        wall = time.perf_counter() - self.t0
        self.prof.stop()
        folder = self.out_dir if trainer.world_size == 1 else os.path.join(self.out_dir, f"rank{trainer.global_rank}")
        os.makedirs(folder, exist_ok=True)
        raw = os.path.join(folder, "trace.json")
        self.prof.export_chrome_trace(raw)
        with open(raw, "rb") as f:
            data = f.read()
        with gzip.open(raw + ".gz", "wb") as g:
            g.write(data)
        os.remove(raw)
        trace = json.loads(data)
        averages = self.prof.key_averages()
        text = "\n\n".join(
            [
                summarize(trace, wall, self.micro_batches),
                averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70),
                averages.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70),
            ]
        )
        with open(os.path.join(folder, "summary.txt"), "w") as f:
            f.write(text + "\n")
        print(text, flush=True)
        self.prof, self.done = None, True

"""bench/fsdp_capped.py reads its figures from the fits' logs: read here from logs of real GPU runs."""

from __future__ import annotations

from pathlib import Path

from bench.fsdp_capped import last_error, load_report, peaks, pinned_peaks

RAW = Path(__file__).resolve().parents[1] / "bench" / "results" / "raw"


def test_a_finished_fit_gives_each_ranks_peak_and_the_load():
    log = (RAW / "2026-12-06-h100-8b-fsdp-capped-fit.log").read_text()
    assert peaks(log) == [3.597, 3.596, 3.595, 3.579]  # ranks in order, whatever order they printed in
    assert pinned_peaks(log) == []  # printed since
    assert load_report(log) == (5.31, 13.4)
    assert last_error(log) is None


def test_a_failed_fit_gives_its_error_and_the_pinned_memory():
    oom = (RAW / "2026-12-07-h100-8b-2rank-4gib-shared-gather-oom.log").read_text()
    assert "OutOfMemoryError" in last_error(oom) and "102.00 MiB" in last_error(oom)
    assert peaks(oom) == [3.847, 3.847]
    offload = (RAW / "2026-12-07-h100-8b-offload-empty-grad-buffer-failed.log").read_text()
    assert pinned_peaks(offload) == [4.688, 4.688]
    assert load_report(offload) == (5.31, 12.5)

"""bench/fsdp_capped.py reads its figures from the fits' logs: read here from logs of real GPU runs."""

from __future__ import annotations

from pathlib import Path

from bench.fsdp_capped import after_load, last_error, load_report, peaks, pinned_peaks

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


def test_the_70b_fit_gives_what_each_rank_held_once_loaded_and_at_its_peak():
    log = (RAW / "2026-12-07-h100-70b-fsdp-capped-fit.log").read_text()
    assert load_report(log) == (36.79, 71.6)
    assert after_load(log) == {"held_gib_per_rank": [19.101, 19.101], "peak_gib_per_rank": [19.884, 19.884]}
    assert peaks(log) == [22.585, 22.585] and last_error(log) is None


def test_an_offloaded_fit_holds_almost_nothing_on_the_gpu_once_loaded():
    log = (RAW / "2026-12-07-h100-8b-2rank-offload-fit.log").read_text()
    assert after_load(log) == {"held_gib_per_rank": [0.143, 0.143], "peak_gib_per_rank": [2.485, 2.485]}
    assert pinned_peaks(log) == [3.688, 3.688] and peaks(log) == [2.167, 2.159]


def test_two_ranks_printing_on_one_line_each_get_their_own_figures():
    """The resumed offload run of 2026-12-07 d: both ranks' peak lines ran together on one line."""
    log = (RAW / "2026-12-07-h100-8b-2rank-offload-10steps-resumed.log").read_text()
    assert peaks(log) == [0.265, 0.265] and pinned_peaks(log) == [3.313, 3.313]
    assert after_load(log) == {"held_gib_per_rank": [0.143, 0.143], "peak_gib_per_rank": [0.397, 0.397]}
    oom = (RAW / "2026-12-07-h100-8b-2rank-4gib-split-embeddings-oom.log").read_text()
    assert "106.00 MiB" in last_error(oom) and after_load(oom)["held_gib_per_rank"] == [2.746, 2.746]

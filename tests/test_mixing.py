"""Several sources in one run: what a weight and a fraction mean, validation rows held out per source (never trained,
not even as a copy), the mix recorded in data_stats.json, and clear messages for entries that cannot work."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import SAMPLE_DATA, TINY_MODEL

from qlora_lit.data import KoAlpacaDataModule
from qlora_lit.data.mixing import DataSource, apportion, epoch_counts, mix, parse_sources
from qlora_lit.errors import ConfigError

CHAT_DATA = "builtin:ko_chat_sample.jsonl"


def test_weights_are_shares_of_an_epoch_that_keeps_its_size_and_fractions_scale_one_source():
    assert epoch_counts([DataSource("a", weight=0.7), DataSource("b", weight=0.3)], [100, 900]) == [700, 300]
    assert epoch_counts([DataSource("a", weight=7), DataSource("b", weight=3)], [100, 900]) == [700, 300]
    assert epoch_counts([DataSource("a", fraction=3), DataSource("b", fraction=0.25), DataSource("c")], [10, 8, 5]) == [
        30,
        2,
        5,
    ]
    assert apportion(10, [1, 1, 1]) == [4, 3, 3] and sum(apportion(1001, [0.2, 0.3, 0.5])) == 1001
    rows = [[{"id": i} for i in range(3)], [{"id": 10 + i} for i in range(10)]]
    drawn = Counter(row["id"] for row in mix(rows, [7, 4]))
    assert [drawn[i] for i in range(3)] == [3, 2, 2]  # repeated as evenly as possible, never drawn at random
    assert sorted(i for i in drawn if i >= 10) == [10, 11, 12, 13] and sum(drawn.values()) == 11


@pytest.fixture(scope="module")
def mixed():
    path = [{"path": CHAT_DATA, "weight": 0.6}, {"path": SAMPLE_DATA, "weight": 0.4}]
    data = KoAlpacaDataModule(path, TINY_MODEL, max_length=256, val_size=0.1, seed=5)
    data.setup()
    return data


def test_the_mix_follows_the_weights_and_validation_holds_out_rows_of_each_source(mixed):
    chat, koalpaca = mixed.stats["sources"]
    assert chat == {"path": CHAT_DATA, "weight": 0.6, "rows": 36, "val_rows": 4, "train_rows": 32, "per_epoch": 160}
    assert koalpaca["val_rows"] == 26 and koalpaca["train_rows"] == koalpaca["rows"] - 26
    assert (
        chat["per_epoch"] + koalpaca["per_epoch"] == len(mixed.train_set) == chat["train_rows"] + koalpaca["train_rows"]
    )
    assert koalpaca["per_epoch"] == round(0.4 * len(mixed.train_set))
    multi_turn = [example for example in mixed.train_set if len(example["trained_spans"]) > 1]
    assert len(multi_turn) > 0.5 * 0.6 * len(mixed.train_set)  # most chat rows have several turns
    validation = {tuple(example["input_ids"]) for example in mixed.val_set}
    assert len(validation) == 30 and not validation & {tuple(example["input_ids"]) for example in mixed.train_set}


def test_the_mix_is_the_same_on_every_run_and_its_own_for_each_seed(mixed):
    again = KoAlpacaDataModule(mixed.hparams.path, TINY_MODEL, max_length=256, val_size=0.1, seed=5)
    again.setup()
    assert again.train_set == mixed.train_set and again.val_set == mixed.val_set
    other = KoAlpacaDataModule(mixed.hparams.path, TINY_MODEL, max_length=256, val_size=0.1, seed=6)
    other.setup()
    assert other.stats["sources"] == mixed.stats["sources"] and other.train_set != mixed.train_set


def test_a_row_count_of_validation_is_shared_in_proportion_to_the_sources():
    data = KoAlpacaDataModule([CHAT_DATA, SAMPLE_DATA], TINY_MODEL, max_length=256, val_size=30)
    data.setup()
    assert [source["val_rows"] for source in data.stats["sources"]] == [4, 26]
    assert [source["per_epoch"] for source in data.stats["sources"]] == [32, 234]  # no weights: every row once


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ([{"path": CHAT_DATA, "weight": 0.5}, SAMPLE_DATA], r"give every entry a weight, or none.*\['builtin:koalpaca"),
        ([{"path": CHAT_DATA, "weight": 0}], r"weight must be a number above 0, got 0"),
        ([{"path": CHAT_DATA, "fraction": "half"}], r"fraction must be a number above 0, got 'half'"),
        (
            [{"path": CHAT_DATA, "wieght": 0.5}],
            r"an entry has a path and, optionally, a weight or a fraction \(unknown",
        ),
        ([{"weight": 0.5}], r"\(no path\)"),
        ([{"path": CHAT_DATA, "weight": 1, "fraction": 2}], r"has both a weight and a fraction; give one"),
        ([3], r"data.path entries are a path or \{path: ..., weight: ...\}, got 3"),
    ],
)
def test_entries_that_cannot_work_are_refused_when_the_config_is_read(path, message):
    with pytest.raises(ConfigError, match=message):
        parse_sources(path)
    with pytest.raises(ConfigError, match=message):
        KoAlpacaDataModule(path, TINY_MODEL)


def test_a_weighted_source_with_nothing_left_to_train_is_named(tmp_path):
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"instruction": "길게 " * 100, "output": "답 " * 100}, ensure_ascii=False) + "\n")
    path = [{"path": str(long), "weight": 1}, {"path": SAMPLE_DATA, "weight": 1}]
    data = KoAlpacaDataModule(path, TINY_MODEL, max_length=128, overlong="drop", val_size=4)
    with pytest.raises(ConfigError, match=r"long.jsonl' has no training rows left .* give it no weight or remove it"):
        data.setup()


def test_each_sources_validation_loss_is_logged_beside_the_whole_sets(tmp_path, monkeypatch):
    """Two sources, one validation loader each: `val_loss/<name>` is that source's loss per label token, and
    `val_loss` still the whole set's (the sources' sums over their tokens, not a mean of the two)."""
    import sys

    import torch
    from conftest import SHORT_FIT
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from qlora_lit.cli import cli_main

    monkeypatch.setattr(sys, "argv", ["qlora_lit"])
    sources = f"[{SAMPLE_DATA}, {{path: {CHAT_DATA}, fraction: 0.5}}]"
    args = ["--data.path", sources, "--trainer.max_steps", "2", "--trainer.logger.init_args.save_dir", str(tmp_path)]
    cli = cli_main([*SHORT_FIT, *args])
    events = EventAccumulator(cli.trainer.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    logged = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"] if tag.startswith("val_loss")}
    assert sorted(logged) == ["val_loss", "val_loss/ko_chat_sample", "val_loss/koalpaca_sample"]

    module, loaders = cli.model.eval(), cli.datamodule.val_dataloader()
    totals = []
    with torch.no_grad():
        for loader in loaders:
            sums = [module.loss_sum(batch) for batch in loader]
            totals.append((sum(loss for loss, _ in sums), sum(tokens for _, tokens in sums)))
    for name, (loss_sum, tokens) in zip(["koalpaca_sample", "ko_chat_sample"], totals, strict=True):
        assert logged[f"val_loss/{name}"] == pytest.approx((loss_sum / tokens).item(), rel=1e-5)
    whole = sum(loss for loss, _ in totals) / sum(tokens for _, tokens in totals)
    assert logged["val_loss"] == pytest.approx(whole.item(), rel=1e-5)
    assert logged["val_loss/ko_chat_sample"] != pytest.approx(logged["val_loss/koalpaca_sample"], rel=1e-3)

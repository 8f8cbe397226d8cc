"""Several sources in one run: each entry of `data.path` may carry a weight or a fraction, and each source gives its
own share of the validation rows.

    data:
      path:
        - {path: ko_chat.jsonl, weight: 0.7}
        - {path: beomi/KoAlpaca-v1.1a, weight: 0.3}

What the numbers mean:
- None given: every training row of every source, once per epoch.
- `fraction: f` on an entry: f times that source's training rows per epoch (0.25: a quarter of them; 3: each row
  three times). Entries without one keep their rows once. For "this much of that source".
- `weight: w` on every entry: the share of each epoch's examples that comes from each source, w over the sum of the
  weights (0.7 and 0.3, or 7 and 3). The epoch keeps its size, the training rows of all sources together. For "this
  mix, whatever the sources' sizes".
A source gives its rows whole: one asked for more examples than it has repeats every row as evenly as possible (each
k or k+1 times), one asked for fewer gives a seeded subset of them; nothing is drawn with replacement. The mix is drawn
once per run, from data.seed, before batching (the subset is the same every epoch): packed rows, length grouping, the
loss's label tokens and the sampler's resumable position all see one training set, as without weights.

Validation: each source is split on its own, before any weighting, so no copy of a validation row is trained on
(`data.val_size` as a fraction applies to each source; as a row count it is shared in proportion to the sources' rows).
Validation rows are not weighted: `val_loss` covers each source's held-out rows once, and `val_loss/<name>` each
source's alone (`source_names`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import torch

from qlora_lit.data.sources import FILE_SUFFIXES
from qlora_lit.errors import ConfigError

ENTRY_KEYS = ("path", "weight", "fraction")


@dataclass(frozen=True)
class DataSource:
    """One entry of `data.path`."""

    path: str
    weight: float | None = None
    """Its share of each epoch's training examples, relative to the other entries' weights."""
    fraction: float | None = None
    """Its training rows per epoch, as a multiple of how many it has."""

    def record(self) -> dict[str, Any]:
        """What data_stats.json says of the entry."""
        return {key: value for key, value in vars(self).items() if value is not None}


def source_names(sources: Sequence[DataSource]) -> list[str]:
    """A short name per source for its metrics (`val_loss/<name>`): the file's or data set's name without folders or
    extension, numbered where two would be the same."""
    names = [PurePosixPath(source.path.rstrip("/").split(":")[-1]) for source in sources]
    stems = [name.stem if name.suffix.lower() in FILE_SUFFIXES else name.name or "data" for name in names]
    return [stem if stems.count(stem) == 1 else f"{stem}-{index + 1}" for index, stem in enumerate(stems)]


def parse_sources(setting: str | Sequence[str | Mapping[str, Any]]) -> list[DataSource]:
    """The entries of `data.path`: a path, or `{path: ..., weight: ...}` / `{path: ..., fraction: ...}`."""
    entries = [setting] if isinstance(setting, str) else list(setting)
    if not entries:
        raise ConfigError("data.path is empty: give a file, a folder, a hub id, or a list of them")
    sources = [parse_entry(entry) for entry in entries]
    weighted = [source.weight is not None for source in sources]
    if any(weighted) and not all(weighted):
        unweighted = [source.path for source in sources if source.weight is None]
        raise ConfigError(
            f"data.path: give every entry a weight, or none (weights are shares of the mix); {unweighted} have none. "
            "For a share of one source's own rows, use fraction"
        )
    return sources


def parse_entry(entry: str | Mapping[str, Any]) -> DataSource:
    if isinstance(entry, str):
        return DataSource(entry)
    if not isinstance(entry, Mapping):
        raise ConfigError(f"data.path entries are a path or {{path: ..., weight: ...}}, got {entry!r}")
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown or not isinstance(entry.get("path"), str) or not entry["path"]:
        raise ConfigError(
            f"data.path entry {dict(entry)!r}: an entry has a path and, optionally, a weight or a fraction"
            + (f" (unknown keys {unknown})" if unknown else " (no path)")
        )
    if "weight" in entry and "fraction" in entry:
        raise ConfigError(f"data.path entry {entry['path']!r} has both a weight and a fraction; give one")
    for key in ("weight", "fraction"):
        value = entry.get(key)
        if key in entry and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
            raise ConfigError(f"data.path entry {entry['path']!r}: {key} must be a number above 0, got {value!r}")
        if key in entry and not math.isfinite(value):
            raise ConfigError(f"data.path entry {entry['path']!r}: {key} must be finite, got {value!r}")
    return DataSource(entry["path"], entry.get("weight"), entry.get("fraction"))


def split_per_source(
    examples: list[list[dict]], val_size: float, seed: int, sources: list[DataSource]
) -> tuple[list[list[dict]], list[list[dict]]]:
    """Each source's examples in a seeded order, split into training and validation rows."""
    sizes = [len(rows) for rows in examples]
    if val_size < 1:
        counts = [max(1, round(val_size * size)) if size else 0 for size in sizes]
    else:
        counts = apportion(int(val_size), sizes)
    train, val = [], []
    for index, (rows, n_val) in enumerate(zip(examples, counts, strict=True)):
        if rows and n_val >= len(rows):
            raise ConfigError(
                f"data.val_size={val_size} leaves no training rows out of {len(rows)} of {sources[index].path!r}"
            )
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + index)).tolist()
        train.append([rows[i] for i in order[n_val:]])
        val.append([rows[i] for i in order[:n_val]])
    return train, val


def epoch_counts(sources: list[DataSource], train_rows: list[int]) -> list[int]:
    """Training examples per epoch from each source (see the module's docstring)."""
    if sources[0].weight is not None:
        counts = apportion(sum(train_rows), [source.weight for source in sources])
    else:
        fractions = [1.0 if source.fraction is None else source.fraction for source in sources]
        counts = [max(1, round(f * n)) if n else 0 for f, n in zip(fractions, train_rows, strict=True)]
    for source, rows, count in zip(sources, train_rows, counts, strict=True):
        if count and not rows:
            raise ConfigError(
                f"data.path entry {source.path!r} has no training rows left (after cleaning, the length policy and "
                "the validation split) to give its share from; give it no weight or remove it"
            )
    return counts


def mix(train: list[list[dict]], counts: list[int]) -> list[dict]:
    """Each source's training rows repeated whole (`count // rows` times) and then its first `count % rows` (its
    rows are in a seeded order already): the epoch's training set, drawn without replacement."""
    drawn = []
    for rows, count in zip(train, counts, strict=True):
        if rows:
            repeats, rest = divmod(count, len(rows))
            drawn += rows * repeats + rows[:rest]
    return drawn


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """`total` split in proportion to `weights` in whole numbers adding up to it (largest remainders first)."""
    if not sum(weights):
        return [0] * len(weights)
    exact = [total * weight / sum(weights) for weight in weights]
    counts = [math.floor(share) for share in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])
    for index in by_remainder[: total - sum(counts)]:
        counts[index] += 1
    return counts

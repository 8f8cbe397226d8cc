"""Deterministic synthetic SFT data (token ids) shared by every benchmarked system.

Run (once; later calls reuse the folder):

    python -m bench.data --out bench/.cache/data/n4096-l512 --n 4096 --max_length 512

Why this distribution. No dataset hub is reachable, so the data are a *modeled stand-in* for
KoAlpaca v1.1a (Korean instruction + answer pairs from Naver KnowledgeiN, ~21k rows) rendered with
the walkthrough's Alpaca-style prompt template and tokenized with the Llama 3 tokenizer. Such
sequences are right-skewed: short questions, answers from one line to long explanations. We model
the total length as lognormal with median 245 tokens and sigma 0.65, clipped to [32, max_length]:
at max_length 512 the mean is ~273 tokens and ~13% of rows hit the cap (at 2048 the mean is ~303).
These are the numbers the project's H200 reference measurements were taken on (issue 7). Only the
lengths matter for speed: the ids are uniform random over the non-special vocabulary
[0, 128000), each row starts with BOS (128000) and ends with EOS (128001), like a tokenized
example with the EOS appended. The first ~30% of each row is the "prompt" (template + instruction):
`completion_mask` is 0 there and 1 on the answer, so a correct trainer puts labels -100 on it.

Columns: `input_ids` (list[int]), `completion_mask` (list[int]), `length` (int).
Saved with `datasets.Dataset.save_to_disk`; all systems load it with `load(path)`.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

MEDIAN = 245
SIGMA = 0.65
MIN_LEN = 32
PROMPT_FRACTION = 0.3
BOS_ID, EOS_ID, FIRST_SPECIAL_ID = 128000, 128001, 128000


def make_lengths(n: int, max_length: int, seed: int = 1234) -> np.ndarray:
    rng = np.random.default_rng(seed)
    raw = MEDIAN * np.exp(SIGMA * rng.standard_normal(n))
    return np.clip(np.rint(raw), MIN_LEN, max_length).astype(np.int64)


def make_rows(n: int, max_length: int, seed: int = 1234) -> dict[str, list]:
    lengths = make_lengths(n, max_length, seed)
    rng = np.random.default_rng(seed + 1)
    ids, masks = [], []
    for L in lengths.tolist():
        row = rng.integers(0, FIRST_SPECIAL_ID, size=L, dtype=np.int64)
        row[0], row[-1] = BOS_ID, EOS_ID
        p = max(1, int(round(PROMPT_FRACTION * L)))
        ids.append(row.tolist())
        masks.append([0] * p + [1] * (L - p))
    return {"input_ids": ids, "completion_mask": masks, "length": lengths.tolist()}


def build(out: str, n: int = 4096, max_length: int = 512, seed: int = 1234) -> str:
    """Write the dataset to `out` unless an identical one is already there."""
    meta = {
        "n": n,
        "max_length": max_length,
        "seed": seed,
        "median": MEDIAN,
        "sigma": SIGMA,
        "min_len": MIN_LEN,
        "prompt_fraction": PROMPT_FRACTION,
    }
    meta_path = os.path.join(out, "bench_meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f) == meta:
                return out
        raise SystemExit(f"{out} holds other data; remove it or pick another --out")
    from datasets import Dataset

    ds = Dataset.from_dict(make_rows(n, max_length, seed))
    ds.save_to_disk(out)
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    return out


def load(path: str):
    from datasets import load_from_disk

    return load_from_disk(path)


def meta(path: str) -> dict:
    with open(os.path.join(path, "bench_meta.json")) as f:
        return json.load(f)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args()
    build(a.out, a.n, a.max_length, a.seed)
    L = make_lengths(a.n, a.max_length, a.seed)
    print(
        json.dumps(
            {
                "out": a.out,
                "n": a.n,
                "mean_len": float(L.mean()),
                "median_len": float(np.median(L)),
                "frac_at_cap": float((a.max_length == L).mean()),
                "tokens": int(L.sum()),
            }
        )
    )


if __name__ == "__main__":
    main()

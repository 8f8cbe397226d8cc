"""Load balance between DDP ranks, from the data alone: how long the faster ranks wait for the slowest each step.

    python -m bench.rank_balance
    python -m bench.rank_balance --world_sizes 2 4 8 --accumulate 1 4 --n_examples 16384 --max_length 512 \\
        --pack_length 2048 --batch_size 2 --out balance.jsonl

Under DDP each optimizer step ends in the gradients' all-reduce, which waits for the rank that took longest over its
micro-batches of the step; if a rank's time follows its work, a step takes the largest rank's work and the fraction
`sum over steps of max_rank(work) / sum of mean_rank(work) - 1` of the time is lost to imbalance.

The batches are those a fit makes of the benchmark's data: lengths drawn as bench/data.py draws them (KoAlpaca-like,
the same seed as bench/scaling.py's text), `--val_size` of them held out, packed by data/packing.py's `pack_rows`,
batched and dealt to ranks by data/sampler.py's EpochBatchSampler (data.seed, epoch 0), each rank's list asked of
the sampler itself. Work is counted four ways, per rank and step:

- real tokens;
- computed tokens: rows x the micro-batch's padded width (the linear layers run on the padding too);
- attention: sum of L (L + 1) / 2 over the examples (causal attention within each example, as varlen computes it);
- time: (1 - a) computed tokens + a attention, each over its mean per row, with `a` = attention's share of the GPU
  time (`--attention_share`, default 0.045: the flash kernels' share of one 8B `base` step's kernel time,
  bench/results/profiles/2026-11-29-h200-8b-512-base-step.txt).

`dealt_largest_first` is the time lost if each step's rows were dealt to its ranks by time, largest first, to the
rank with the least so far that has a slot left (each rank keeping its number of rows): what a balancing sampler could
recover at most, roughly (a micro-batch's padding is not re-counted).
"""

from __future__ import annotations

import argparse
import json

from bench import data as bench_data
from qlora_lit.data.collate import padded_width
from qlora_lit.data.packing import pack_rows
from qlora_lit.data.sampler import EpochBatchSampler

MEASURES = ("real_tokens", "computed_tokens", "attention", "time")


def packed_rows(a: argparse.Namespace) -> tuple[list[int], list[int]]:
    """Each packed row's tokens and attention pairs."""
    lengths = bench_data.make_lengths(a.n_examples, a.max_length).tolist()
    lengths = lengths[: round(len(lengths) * (1 - a.val_size))]  # the draws are independent: any share is alike
    rows = pack_rows(lengths, a.pack_length)
    tokens = [sum(lengths[i] for i in row) for row in rows]
    pairs = [sum(lengths[i] * (lengths[i] + 1) // 2 for i in row) for row in rows]
    return tokens, pairs


class Work:
    """The work of packed rows and micro-batches in each of MEASURES; time in units of an average row."""

    def __init__(self, tokens: list[int], pairs: list[int], attention_share: float) -> None:
        self.tokens, self.pairs, self.share = tokens, pairs, attention_share
        self.mean_computed = sum(padded_width(t, 8) for t in tokens) / len(tokens)
        self.mean_pairs = sum(pairs) / len(pairs)

    def time(self, computed: float, pairs: float) -> float:
        return (1 - self.share) * computed / self.mean_computed + self.share * pairs / self.mean_pairs

    def row_time(self, row: int) -> float:
        return self.time(self.tokens[row], self.pairs[row])

    def of_batch(self, batch: list[int]) -> dict[str, float]:
        computed = len(batch) * padded_width(max(self.tokens[i] for i in batch), 8)
        attention = sum(self.pairs[i] for i in batch)
        real = sum(self.tokens[i] for i in batch)
        return {
            "real_tokens": real,
            "computed_tokens": computed,
            "attention": attention,
            "time": self.time(computed, attention),
        }


def steps(world_size: int, accumulate: int, work: Work, a: argparse.Namespace):
    """Per optimizer step: each rank's micro-batches of the step, as the sampler deals them."""
    sampler = EpochBatchSampler(work.tokens, a.batch_size, seed=a.seed, accumulate=accumulate)
    per_rank = [sampler.batches_of(rank, world_size) for rank in range(world_size)]
    for start in range(0, len(per_rank[0]), accumulate):
        yield [batches[start : start + accumulate] for batches in per_rank]


def dealt_largest_first(rows_per_rank: list[list[int]], work: Work) -> list[float]:
    """Each rank's time when the step's rows go, largest first, to the least loaded rank with a slot left."""
    slots = [len(rows) for rows in rows_per_rank]
    loads = [0.0] * len(rows_per_rank)
    for row in sorted((row for rows in rows_per_rank for row in rows), key=work.row_time, reverse=True):
        rank = min((r for r in range(len(loads)) if slots[r]), key=lambda r: loads[r])
        loads[rank] += work.row_time(row)
        slots[rank] -= 1
    return loads


def lost_time(world_size: int, accumulate: int, work: Work, a: argparse.Namespace) -> dict:
    """The time lost to imbalance (sum of the largest rank's work / sum of the mean - 1), in each measure."""
    largest = dict.fromkeys([*MEASURES, "dealt"], 0.0)
    mean = dict.fromkeys([*MEASURES, "dealt"], 0.0)
    count = 0
    for step in steps(world_size, accumulate, work, a):
        count += 1
        loads = {key: [0.0] * world_size for key in MEASURES}
        for rank, batches in enumerate(step):
            for batch in batches:
                for key, value in work.of_batch(batch).items():
                    loads[key][rank] += value
        loads["dealt"] = dealt_largest_first([[row for batch in batches for row in batch] for batches in step], work)
        for key, values in loads.items():
            largest[key] += max(values)
            mean[key] += sum(values) / world_size
    lost = {key: largest[key] / mean[key] - 1 for key in largest}
    dealt = lost.pop("dealt")
    return {
        "world_size": world_size,
        "accumulate": accumulate,
        "steps": count,
        "lost": lost,
        "lost_dealt_largest_first": dealt,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world_sizes", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--accumulate", type=int, nargs="+", default=[1, 4], help="micro-batches per step on each rank")
    p.add_argument("--n_examples", type=int, default=16384, help="rows drawn (bench/scaling.py's data: 16384)")
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--pack_length", type=int, default=2048, help="configs/base.yaml's data.pack_length")
    p.add_argument("--batch_size", type=int, default=2, help="packed rows per micro-batch (base-b2: 2)")
    p.add_argument("--val_size", type=float, default=0.02, help="share held out for validation (base.yaml: 0.02)")
    p.add_argument("--seed", type=int, default=42, help="data.seed (default 42)")
    p.add_argument("--attention_share", type=float, default=0.045, help="attention's share of the GPU time")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    a = p.parse_args()
    tokens, pairs = packed_rows(a)
    work = Work(tokens, pairs, a.attention_share)
    print(f"{len(tokens)} packed rows, {sum(tokens) / len(tokens):.1f} real tokens each on average (min {min(tokens)})")
    columns = ["ranks", "accumulation", "steps", *MEASURES, "time, dealt largest first"]
    print("| " + " | ".join(columns) + " |\n" + "| ---: " * len(columns) + "|")
    for world_size in a.world_sizes:
        for accumulate in a.accumulate:
            result = lost_time(world_size, accumulate, work, a)
            cells = [f"{100 * result['lost'][key]:.2f}%" for key in MEASURES]
            cells.append(f"{100 * result['lost_dealt_largest_first']:.2f}%")
            print(f"| {world_size} | {accumulate} | {result['steps']} | " + " | ".join(cells) + " |")
            if a.out:
                with open(a.out, "a") as f:
                    f.write(json.dumps({**result, "settings": vars(a)}) + "\n")


if __name__ == "__main__":
    main()

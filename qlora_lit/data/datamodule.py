"""The LightningDataModule: sources -> conversations, cleaned -> prompt format -> tokens (cached) -> length policy ->
split and mix per source -> batches."""

from __future__ import annotations

import codecs
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from qlora_lit.cache import default_cache_dir
from qlora_lit.data.collate import PaddingCollator, StepTaggedDataset, label_count
from qlora_lit.data.conversations import assistant_turns, to_json
from qlora_lit.data.inference import PromptCollator, encode_prompts, read_prompts_file
from qlora_lit.data.length import fit_to_length
from qlora_lit.data.mixing import DataSource, epoch_counts, mix, parse_sources, source_names, split_per_source
from qlora_lit.data.packing import PackedDataset, PackingCollator, pack_rows
from qlora_lit.data.prompts import DEFAULT_FORMAT, PromptFormat, PromptFormatName, check_format_name
from qlora_lit.data.sampler import EpochBatchSampler, batch_count
from qlora_lit.data.sources import check_columns, load_conversations, source_fingerprint
from qlora_lit.data.token_cache import (
    CachedRow,
    cache_key,
    damage,
    error_text,
    read_tokens,
    tokenizer_fingerprint,
    write_tokens,
)
from qlora_lit.disk_space import ensure_writable
from qlora_lit.errors import ConfigError
from qlora_lit.tokenizer import load_tokenizer

OverlongPolicy = Literal["truncate", "drop"]
OVERLONG_POLICIES = get_args(OverlongPolicy)
BadRowPolicy = Literal["error", "skip"]
BAD_ROW_POLICIES = get_args(BadRowPolicy)


# The data settings that decide which rows are trained and validated and in which order: a resumed run that changes
# one continues another split and order (said on resume).
ORDER_SETTINGS = ("path", "columns", "val_size", "seed", "max_length", "overlong", "pack_length", "group_by_length")


@dataclass(eq=False, repr=False)
class KoAlpacaDataModule(L.LightningDataModule):
    """Conversations (`messages`, ShareGPT `conversations`, or KoAlpaca's instruction, optional input, output) as
    label-masked batches, padded or packed.

    Each field is a `data.*` setting (YAML and command line), explained beneath it; `__post_init__` refuses the
    settings that cannot work when the config is parsed.
    """

    path: str | list[str | dict[str, Any]] = "beomi/KoAlpaca-v1.1a"
    """A hub dataset id, a local .jsonl/.json/.csv/.parquet file, a `save_to_disk` folder, `builtin:<file>`, or a list
    of these (their rows are concatenated). An entry of the list may be `{path: ..., weight: w}` (the source's share
    of each epoch's training examples; then every entry has one) or `{path: ..., fraction: f}` (f times the source's
    training rows per epoch); see qlora_lit/data/mixing.py."""
    tokenizer: str = "builtin:tiny-llama"
    """Tokenizer name or path; LightningCLI links it to `model.model_name_or_path`. (Once loaded, the tokenizer itself
    takes this attribute; the name stays in `tokenizer_name`.)"""
    columns: dict[str, str] | None = None
    """The source's column names for our fields when they differ, e.g. {instruction: question, output: answer} or
    {messages: dialog, role: speaker, content: text} (fields: instruction, input, output, system; messages, the
    conversation column, and role and content, the keys of its messages; other columns are ignored). Without it,
    `messages` (role/content) and `conversations` (ShareGPT's from/value) columns are found by name."""
    encoding: str = "utf-8"
    """Text encoding of CSV and JSON files, e.g. cp949 for Korean Excel exports."""
    system_prompt: str | None = None
    """The system prompt of every row that has none (rows may carry their own: a system message, or a `system`
    column); `generate` and `chat` prompt the trained adapter with it too."""
    bad_rows: BadRowPolicy = "error"
    """A row that is no conversation (an unknown role, no assistant turn, an empty message, roles out of order):
    `error` stops with a message naming its file, line and problem; `skip` leaves it out, counted in
    data_stats.json."""
    prompt_format: PromptFormatName = DEFAULT_FORMAT
    """`koalpaca` (the KoAlpaca template, extended to conversations and system prompts) or `chat` (the tokenizer's
    chat template, for instruct models). Either way the loss covers every assistant turn and its end of turn."""
    max_length: int = 512
    """Longest example in tokens."""
    overlong: OverlongPolicy = "truncate"
    """What happens to rows longer than `max_length`: `truncate` (a conversation drops whole earlier turns, keeping
    its system prompt, until it fits; with only its last turn left it is cut and its answer loses the EOS) or
    `drop`."""
    pack_length: int | None = None
    """Pack several examples into rows of up to this many tokens (0 or null: no packing); each example attends only
    to itself. `batch_size` then counts rows. Must be at least `max_length`. Validation batches stay unpacked."""
    batch_size: int = 2
    """Examples (or packed rows) per micro-batch on each device."""
    val_size: float = 0.05
    """Validation share of the rows (a float in (0, 1): of each source) or a row count (an int >= 1: shared among
    the sources in proportion to their rows)."""
    seed: int = 42
    """Seed of the train/validation split and of the shuffling."""
    train_on_prompt: bool = False
    """Also train on the prompt tokens, as the walkthrough did; by default only the response is."""
    group_by_length: bool = False
    """Put examples of similar length in the same batch (less padding, same examples per epoch)."""
    pad_to_multiple_of: int = 8
    """Pad batch width to a multiple of this (tensor-core friendly shapes)."""
    num_workers: int = 0
    """DataLoader worker processes."""
    cache_dir: str | None = None
    """Where the tokenized data are kept (default `$QLORA_LIT_CACHE` or ~/.cache/qlora_lit, as when the data module
    is made)."""
    predict_path: str | None = None
    """JSONL prompts file that `predict` answers: an "instruction" and optional "input" per line, or a conversation
    (`messages` or `conversations`) whose last turn is the user's."""
    trust_remote_code: bool = False
    """Run code shipped with the tokenizer; LightningCLI links it to `model.trust_remote_code`."""

    def __post_init__(self) -> None:
        super().__init__()
        self.check_settings()
        self.save_hyperparameters()  # the fields, as given
        self.tokenizer_name = self.tokenizer
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.format: PromptFormat | None = None  # data.prompt_format for this tokenizer, made with it
        self.sources: list[DataSource] = parse_sources(self.path)
        self.pack_length = self.pack_length or None
        self.cache_dir = Path(self.cache_dir) if self.cache_dir else default_cache_dir()
        self.train_set: list[dict] = []
        self.val_set: list[dict] = []
        self.val_by_source: dict[str, list[dict]] = {}  # with several sources: each one's validation rows, by name
        self.packed_rows: list[list[int]] = []
        self.stats: dict[str, Any] = {}
        self.train_sampler: EpochBatchSampler | None = None
        self.resume_position: dict[str, int] = {}
        self.restored_batches = 0
        self.predict_rows: list[dict] = []

    def check_settings(self) -> None:
        """Every data setting that cannot work fails here, at parse time, with what to change."""
        parse_sources(self.path)
        check_columns(self.columns)
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ConfigError(
                f"data.encoding {self.encoding!r} is not an encoding Python knows (e.g. utf-8, cp949)"
            ) from None
        check_format_name(self.prompt_format)
        if self.max_length < 16:
            raise ConfigError(f"data.max_length must be at least 16 tokens, got {self.max_length}")
        if self.overlong not in OVERLONG_POLICIES:
            raise ConfigError(f"data.overlong must be one of {list(OVERLONG_POLICIES)}, got {self.overlong!r}")
        if self.bad_rows not in BAD_ROW_POLICIES:
            raise ConfigError(f"data.bad_rows must be one of {list(BAD_ROW_POLICIES)}, got {self.bad_rows!r}")
        if self.pack_length and self.pack_length < self.max_length:
            raise ConfigError(
                f"data.pack_length={self.pack_length} must be 0/null (no packing) or >= "
                f"data.max_length={self.max_length}"
            )
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if not (0 < self.val_size < 1 or (self.val_size >= 1 and float(self.val_size).is_integer())):
            raise ConfigError(f"data.val_size must be a fraction in (0, 1) or a whole row count, got {self.val_size}")
        if self.pad_to_multiple_of < 1:
            raise ConfigError(f"data.pad_to_multiple_of must be >= 1 (1: no rounding), got {self.pad_to_multiple_of}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0 (0: load in the main process), got {self.num_workers}")

    @property
    def paths(self) -> list[str]:
        return [source.path for source in self.sources]

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer, loaded once, and with it the prompt format (`self.format`)."""
        if self.tokenizer is None:
            tokenizer = load_tokenizer(self.tokenizer_name, self.trust_remote_code)
            setting = f"data.prompt_format={self.prompt_format}"
            self.format = PromptFormat.named(self.prompt_format, tokenizer, setting, self.tokenizer_name)
            self.tokenizer = tokenizer
        return self.tokenizer

    @property
    def cache_path(self) -> Path:
        """The token cache of these sources, read this way, with this tokenizer and template."""
        tokenizer = self.load_tokenizer()
        key = cache_key(
            [source_fingerprint(path) for path in self.paths],
            self.columns,
            codecs.lookup(self.encoding).name,
            self.system_prompt,
            self.bad_rows,
            tokenizer_fingerprint(tokenizer),
            self.format.fingerprint(),
        )
        return self.cache_dir / f"tokens-{key}.parquet"

    @property
    def cache_setting(self) -> str:
        """The setting that names the cache folder, for messages."""
        if self.cache_dir != default_cache_dir():
            return "data.cache_dir"
        if "QLORA_LIT_CACHE" in os.environ:
            return "QLORA_LIT_CACHE"
        return "QLORA_LIT_CACHE or data.cache_dir (the default, ~/.cache/qlora_lit, is in your home folder)"

    def prepare_data(self) -> None:
        """Read, clean and tokenize the sources once per node (Lightning calls this on one process per node)."""
        if self.trainer is not None and self.trainer.predicting:
            return  # predicting reads only data.predict_path
        path = self.cache_path
        if path.exists():
            problem = damage(path)
            if problem is None:
                return
            rank_zero_warn(f"the token cache {path} cannot be read ({problem}): tokenizing the data again")
        self.write_cache(path)

    def write_cache(self, path: Path) -> None:
        ensure_writable(self.cache_dir, "the tokenized data", self.cache_setting)  # before minutes of tokenizing
        conversations, origins, stats = load_conversations(
            self.paths, self.columns, self.encoding, self.system_prompt, self.bad_rows
        )
        self.load_tokenizer()
        encoded = self.format.encode(conversations)
        rows = [
            CachedRow(tokens, origin, assistant_turns(conversation), to_json(conversation))
            for tokens, origin, conversation in zip(encoded, origins, conversations, strict=True)
        ]
        write_tokens(path, rows, stats)

    def read_cache(self) -> tuple[list[CachedRow], dict]:
        path = self.cache_path
        try:
            return read_tokens(path)
        except (OSError, ValueError) as err:  # damaged inside, where prepare_data's look at its footer cannot see
            rank_zero_warn(f"the token cache {path} cannot be read ({error_text(err)}): tokenizing the data again")
            self.write_cache(path)
            return read_tokens(path)

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            self._setup_predict()
            return
        if self.train_set:
            return
        self.prepare_data()  # a no-op when the cache exists; makes setup() usable on its own
        rows, self.stats = self.read_cache()
        examples, counts = fit_to_length(rows, self.max_length, self.overlong, self.format)
        self.stats.update(counts)
        if not examples:
            advice = "raise data.max_length" + (" or use data.overlong: truncate" if self.overlong == "drop" else "")
            raise ConfigError(
                f"no rows left: all {len(rows)} are longer than data.max_length={self.max_length} with "
                f"data.overlong={self.overlong} ({self.stats}); {advice}"
            )
        self.train_set, self.val_set = self._split(examples)
        self.stats.update(train_rows=len(self.train_set), val_rows=len(self.val_set))
        if self.pack_length:
            self.packed_rows = pack_rows([len(example["input_ids"]) for example in self.train_set], self.pack_length)
            self.stats["packed_train_rows"] = len(self.packed_rows)
        self.check_a_batch_per_device()
        rank_zero_info(f"data {self.path}: {self.stats}")

    def check_a_batch_per_device(self) -> None:
        """Every device trains on whole batches only (EpochBatchSampler), so fewer batches than devices is zero steps:
        Lightning would stop at once ("No training batches") and the run would export an untrained adapter."""
        devices = self.trainer.world_size if self.trainer is not None else 1
        rows = len(self.packed_rows) if self.pack_length else len(self.train_set)
        batches = batch_count(rows, self.batch_size)
        if batches < devices:
            kind = "packed rows" if self.pack_length else "rows"
            raise ConfigError(
                f"the training split has {rows} {kind}, {batches} batch(es) of data.batch_size={self.batch_size}, "
                f"fewer than the {devices} devices: training would run zero steps. Lower data.batch_size or "
                "data.val_size, add data, or use fewer devices"
            )

    def _setup_predict(self) -> None:
        """Only the prompts to answer: predicting never reads (or downloads) the training data."""
        if self.predict_path is None:
            raise ConfigError(
                'predict needs data.predict_path: a JSONL file with an "instruction" (or "messages") per line'
            )
        self.load_tokenizer()
        self.predict_rows = read_prompts_file(self.predict_path, self.encoding)

    def _split(self, examples: list[tuple[int, dict]]) -> tuple[list[dict], list[dict]]:
        """Training and validation examples: each source split on its own, then the training rows mixed by the
        sources' weights or fractions (data/mixing.py); what each source gave is recorded in `stats["sources"]`."""
        by_source: list[list[dict]] = [[] for _ in self.sources]
        for source, example in examples:
            by_source[source].append(example)
        train, val = split_per_source(by_source, self.val_size, self.seed, self.sources)
        counts = epoch_counts(self.sources, [len(rows) for rows in train])
        self.stats["sources"] = [
            {**source.record(), "rows": len(rows), "val_rows": len(held), "train_rows": len(kept), "per_epoch": count}
            for source, rows, held, kept, count in zip(self.sources, by_source, val, train, counts, strict=True)
        ]
        names = source_names(self.sources)
        self.val_by_source = {name: rows for name, rows in zip(names, val, strict=True) if rows}
        return mix(train, counts), [example for rows in val for example in rows]

    def collator(self) -> PaddingCollator:
        return PaddingCollator(self.tokenizer.pad_token_id, self.train_on_prompt, self.pad_to_multiple_of)

    def train_items(self) -> tuple[list[dict] | PackedDataset, list[int], list[int]]:
        """What the sampler batches (examples, or packed rows of examples), their lengths and their label tokens."""
        if self.pack_length:
            packed = PackedDataset(self.train_set, self.packed_rows, self.train_on_prompt)
            return packed, packed.lengths(), packed.label_counts()
        lengths = [len(example["input_ids"]) for example in self.train_set]
        return self.train_set, lengths, [label_count(example, self.train_on_prompt) for example in self.train_set]

    def train_dataloader(self) -> DataLoader:
        items, lengths, label_counts = self.train_items()
        self.train_sampler = EpochBatchSampler(
            lengths,
            self.batch_size,
            seed=self.seed,
            group_by_length=self.group_by_length,
            label_counts=label_counts,
            accumulate=self.trainer.accumulate_grad_batches if self.trainer is not None else 1,
            progress=self.training_progress if self.trainer is not None else None,
        )
        if self.train_sampler.dropped_batches:
            rank_zero_info(
                f"data: each epoch leaves out its last {self.train_sampler.dropped_batches} of "
                f"{batch_count(len(lengths), self.batch_size)} batches (of up to {self.batch_size} "
                f"{'packed rows' if self.pack_length else 'examples'}), so that the "
                f"{EpochBatchSampler.world()[1]} ranks get as many; the order is shuffled each epoch"
            )
        if self.resume_position and self.trainer is not None:
            self.report_resume_position(self.train_sampler, self.resume_position)
            self.resume_position = {}
        pad_id = self.tokenizer.pad_token_id
        return DataLoader(
            StepTaggedDataset(items),
            batch_sampler=self.train_sampler,
            collate_fn=PackingCollator(pad_id, self.pad_to_multiple_of) if self.pack_length else self.collator(),
            num_workers=self.num_workers,
            # Its own generator: creating the iterator must not draw from the global stream (LoRA dropout),
            # or a resumed run would diverge from an uninterrupted one.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """This rank's share of the validation rows (`rank_share`: each row on one rank); with several sources, one
        loader per source that holds rows out (in `val_by_source`'s order), so that `val_loss` is also logged per
        source (`val_loss/<name>`)."""
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        sets = list(self.val_by_source.values()) if len(self.val_by_source) > 1 else [self.val_set]
        loaders = [
            DataLoader(
                rank_share(rows, rank, world_size),
                batch_size=self.batch_size,
                collate_fn=self.collator(),
                num_workers=self.num_workers,
            )
            for rows in sets
        ]
        return loaders if len(loaders) > 1 else loaders[0]

    def predict_dataloader(self) -> DataLoader:
        """Each rank answers every world_size-th prompt, wrapped in the training template, none twice.

        Uneven shares are fine: Lightning does not wrap the model in DDP for predict, so ranks never wait on each other.
        """
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        ids = encode_prompts(self.tokenizer, self.predict_rows, self.prompt_format, self.system_prompt)
        items = [{"input_ids": ids[index], "index": index} for index in range(rank, len(ids), world_size)]
        return DataLoader(items, batch_size=self.batch_size, collate_fn=PromptCollator(self.tokenizer))

    def training_progress(self) -> tuple[int, int]:
        """Batches this rank has trained in the run (Lightning saves and restores the count), and in Lightning's
        current epoch. Lightning's epoch number is no data position: an epoch that max_steps ended counts as complete
        though the rest of its batches are still to train (an extended run trains them next), and a checkpoint saved
        after an epoch's last batch resumes inside that used-up epoch (its pass is empty: a batch trained there would
        end the epoch, an optimizer step after a single micro-batch under accumulation)."""
        progress = self.trainer.fit_loop.epoch_loop.batch_progress
        # A pass can start before Lightning restores its loops (epoch-based runs with data.num_workers > 0 create
        # the loader's iterator while estimating the steps): the checkpoint's own count stands in.
        return max(progress.total.processed, self.restored_batches), progress.current.ready

    def state_dict(self) -> dict[str, Any]:
        """The data position, saved in checkpoints to be shown on resume and to tell when the batches changed, and the
        settings that decide the split and the order (`ORDER_SETTINGS`), to tell when those changed."""
        if self.trainer is None or self.train_sampler is None:
            return {}
        epoch, done = self.train_sampler.position(self.training_progress()[0])
        settings = self.order_settings()
        return {
            "epoch": epoch,
            "batches_done": done,
            "batches_per_epoch": len(self.train_sampler),
            "settings": settings,
        }

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.resume_position = dict(state_dict)
        if "batches_per_epoch" in state_dict:  # earlier checkpoints numbered Lightning's epochs: its count serves
            self.restored_batches = state_dict["epoch"] * state_dict["batches_per_epoch"] + state_dict["batches_done"]

    def teardown(self, stage: str) -> None:
        self.restored_batches = 0  # a later fit starts from its own checkpoint or from the beginning

    def order_settings(self) -> dict[str, Any]:
        """ORDER_SETTINGS as given, as JSON values: checkpoints load with torch.load(weights_only=True), which takes
        plain containers only."""
        return json.loads(json.dumps({name: self.hparams.get(name) for name in ORDER_SETTINGS}, default=str))

    def report_resume_position(self, sampler: EpochBatchSampler, saved: dict[str, Any]) -> None:
        epoch, done = sampler.position(self.training_progress()[0])
        rank_zero_info(f"resuming the data at epoch {epoch} after {done} batches")
        before = saved.get("settings") or {}  # checkpoints before 2026-12-08 have none
        now = self.order_settings()
        changed = [
            f"data.{name} {before[name]!r} -> {now[name]!r}"
            for name in ORDER_SETTINGS
            if name in before and before[name] != now[name]
        ]
        if changed:
            rank_zero_warn(
                f"data settings changed since the checkpoint ({'; '.join(changed)}): the train/validation split and "
                "the order of the examples are not the checkpoint's run's, so rows it trained on may now be "
                "validation rows, and rows of this epoch may be trained twice or not at all. Resume with the run's "
                "settings to continue it exactly"
            )
        if saved.get("batches_per_epoch", len(sampler)) != len(sampler):
            rank_zero_warn(
                f"the checkpoint's run had {saved['batches_per_epoch']} batches per epoch on each device, this one has "
                f"{len(sampler)} (the data, data.batch_size or the number of devices changed): training continues "
                f"after as many batches as were trained, not with the examples that came next"
            )


def rank_share(rows: list[dict], rank: int, world_size: int) -> list[dict]:
    """Every `world_size`-th row from `rank` on, evened out with label-less copies ("filler": no loss, no tokens) so
    that every rank runs as many validation batches: under FSDP (and DDP's forward) the ranks meet in every forward
    pass. The ranks' loss sums then add up to the whole set's, each row counted once."""
    share = rows[rank::world_size]
    fillers = -(-len(rows) // world_size) - len(share)
    return share + [{**rows[0], "filler": True}] * fillers if fillers else share

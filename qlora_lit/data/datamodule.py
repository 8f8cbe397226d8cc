"""The LightningDataModule: source -> clean/dedup -> prompt -> tokenize -> padded batches."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from qlora_lit.assets import resolve_asset
from qlora_lit.data.collate import PaddingCollator, StepTaggedDataset, label_count
from qlora_lit.data.inference import PromptCollator, encode_prompts, read_prompts_file
from qlora_lit.data.prompts import build_prompt, encode_example
from qlora_lit.data.sampler import EpochBatchSampler
from qlora_lit.data.sources import clean_table, load_table
from qlora_lit.errors import ConfigError, not_found_message

# Lightning warns on mid-epoch resume unless the DataLoader is stateful; here the DataModule carries the position
# (state_dict below) and the sampler skips what was trained, so the warning would be wrong.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


def default_cache_dir() -> Path:
    return Path(os.environ.get("QLORA_LIT_CACHE", Path.home() / ".cache" / "qlora_lit"))


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer; one without a pad token pads with EOS (safe: labels are masked by position)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_asset(name_or_path))
    except OSError as err:
        raise ConfigError(not_found_message("tokenizer", name_or_path, err)) from err
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer {name_or_path!r} has no EOS token: the model could not learn to stop")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class KoAlpacaDataModule(L.LightningDataModule):
    """KoAlpaca-style instruction data (instruction, optional input, output) as padded, label-masked batches.

    Args:
        path: a hub dataset id, a local .jsonl/.json/.csv/.parquet file, a `save_to_disk` folder, or `builtin:<file>`.
        tokenizer: tokenizer name or path; LightningCLI links it to `model.model_name_or_path`.
        max_length: longest example in tokens; longer ones are cut (their response loses the EOS).
        batch_size: examples per micro-batch on each device.
        val_size: validation share of the rows (a float in (0, 1)) or a row count (an int >= 1).
        seed: seed of the train/validation split and of the shuffling.
        train_on_prompt: also train on the prompt tokens, as the walkthrough did; by default only the response is.
        group_by_length: put examples of similar length in the same batch (less padding, same examples per epoch).
        pad_to_multiple_of: pad batch width to a multiple of this (tensor-core friendly shapes).
        num_workers: DataLoader worker processes.
        cache_dir: where the cleaned copy of the data is kept (default `$QLORA_LIT_CACHE` or ~/.cache/qlora_lit).
        predict_path: JSONL prompts file (an "instruction" and optional "input" per line) that `predict` answers.
    """

    def __init__(
        self,
        path: str = "beomi/KoAlpaca-v1.1a",
        tokenizer: str = "builtin:tiny-llama",
        max_length: int = 512,
        batch_size: int = 2,
        val_size: float = 0.05,
        seed: int = 42,
        train_on_prompt: bool = False,
        group_by_length: bool = False,
        pad_to_multiple_of: int = 8,
        num_workers: int = 0,
        cache_dir: str | None = None,
        predict_path: str | None = None,
    ) -> None:
        super().__init__()
        if max_length < 16:
            raise ConfigError(f"data.max_length must be at least 16 tokens, got {max_length}")
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}")
        if not (0 < val_size < 1 or (val_size >= 1 and float(val_size).is_integer())):
            raise ConfigError(f"data.val_size must be a fraction in (0, 1) or a whole row count, got {val_size}")
        self.save_hyperparameters()
        self.path = path
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.val_size = val_size
        self.seed = seed
        self.train_on_prompt = train_on_prompt
        self.group_by_length = group_by_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.train_set: list[dict] = []
        self.val_set: list[dict] = []
        self.stats: dict[str, int] = {}
        self.resume_position: dict[str, int] = {}
        self.predict_path = predict_path
        self.predict_rows: list[dict] = []

    @property
    def clean_path(self) -> Path:
        """The cleaned copy of the source, keyed by what the source is (and, for files, their size and time)."""
        source = Path(resolve_asset(self.path)).expanduser()
        key = [self.path]
        if source.exists():
            stat = source.stat()
            key += [str(source.resolve()), stat.st_size, stat.st_mtime_ns]
        digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
        return self.cache_dir / f"clean-{digest}.parquet"

    def prepare_data(self) -> None:
        """Load, clean and cache the source once per node (Lightning calls this on one process only)."""
        if self.clean_path.exists() or (self.trainer is not None and self.trainer.predicting):
            return
        table, stats = clean_table(load_table(self.path))
        self.clean_path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.clean_path.with_suffix(f".{os.getpid()}.tmp")
        table.to_parquet(partial)
        partial.with_suffix(".json").write_text(json.dumps(stats))
        os.replace(partial.with_suffix(".json"), self.clean_path.with_suffix(".json"))
        os.replace(partial, self.clean_path)

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            self._setup_predict()
            return
        if self.train_set:
            return
        self.prepare_data()  # a no-op when the cache exists; makes setup() usable on its own
        self.tokenizer = load_tokenizer(self.tokenizer_name)
        table = pd.read_parquet(self.clean_path)
        self.stats = json.loads(self.clean_path.with_suffix(".json").read_text())
        examples = [self._encode(row) for row in table.itertuples(index=False)]
        usable = [example for example in examples if len(example["input_ids"]) > example["prompt_length"]]
        self.stats["prompt_too_long_dropped"] = len(examples) - len(usable)
        self.stats["truncated"] = sum(len(example["input_ids"]) == self.max_length for example in usable)
        self.train_set, self.val_set = self._split(usable)
        self.stats.update(train_rows=len(self.train_set), val_rows=len(self.val_set))
        rank_zero_info(f"data {self.path}: {self.stats}")

    def _setup_predict(self) -> None:
        """Only the prompts to answer: predicting never reads (or downloads) the training data."""
        if self.predict_path is None:
            raise ConfigError('predict needs data.predict_path: a JSONL file with an "instruction" per line')
        self.tokenizer = self.tokenizer or load_tokenizer(self.tokenizer_name)
        self.predict_rows = read_prompts_file(self.predict_path)

    def _encode(self, row) -> dict:
        return encode_example(self.tokenizer, build_prompt(row.instruction, row.input), row.output, self.max_length)

    def _split(self, examples: list[dict]) -> tuple[list[dict], list[dict]]:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(self.seed)).tolist()
        n_val = int(self.val_size) if self.val_size >= 1 else max(1, round(self.val_size * len(examples)))
        if n_val >= len(examples):
            raise ConfigError(f"data.val_size={self.val_size} leaves no training rows out of {len(examples)}")
        return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]

    def collator(self) -> PaddingCollator:
        return PaddingCollator(self.tokenizer.pad_token_id, self.train_on_prompt, self.pad_to_multiple_of)

    def train_dataloader(self) -> DataLoader:
        sampler = EpochBatchSampler(
            [len(example["input_ids"]) for example in self.train_set],
            self.batch_size,
            seed=self.seed,
            group_by_length=self.group_by_length,
            label_counts=[label_count(example, self.train_on_prompt) for example in self.train_set],
            accumulate=self.trainer.accumulate_grad_batches if self.trainer is not None else 1,
        )
        if self.resume_position and self.trainer is not None:
            if self.resume_position["epoch"] == self.trainer.current_epoch:
                sampler.skip_batches = self.resume_position["batches_done"]
            self.resume_position = {}
        return DataLoader(
            StepTaggedDataset(self.train_set),
            batch_sampler=sampler,
            collate_fn=self.collator(),
            num_workers=self.num_workers,
            # Its own generator: creating the iterator must not draw from the global stream (LoRA dropout),
            # or a resumed run would diverge from an uninterrupted one.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set, batch_size=self.batch_size, collate_fn=self.collator(), num_workers=self.num_workers
        )

    def predict_dataloader(self) -> DataLoader:
        """Each rank answers every world_size-th prompt, wrapped in the training template, none twice.

        Uneven shares are fine: Lightning does not wrap the model in DDP for predict, so ranks never wait on each other.
        """
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        ids = encode_prompts(self.tokenizer, self.predict_rows)
        items = [{"input_ids": ids[index], "index": index} for index in range(rank, len(ids), world_size)]
        return DataLoader(items, batch_size=self.batch_size, collate_fn=PromptCollator(self.tokenizer))

    def state_dict(self) -> dict[str, int]:
        """The data position, saved in checkpoints: a resumed run skips the batches this epoch already trained."""
        if self.trainer is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": self.trainer.current_epoch, "batches_done": progress.processed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.resume_position = dict(state_dict)
        if state_dict:
            rank_zero_info(
                f"resuming the data at epoch {state_dict['epoch']} after {state_dict['batches_done']} batches"
            )

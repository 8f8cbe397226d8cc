"""`python -m qlora_lit data-stats --config configs/X.yaml`: the data in tokens, before spending GPU hours on them.

It reads the `data:` section (and `model.model_name_or_path`, the tokenizer) of the YAML that `fit` takes, runs the
data module's own reading, cleaning and tokenization (filling the token cache that `fit` then reuses), and prints
what was dropped, token length percentiles, how many rows `max_length` cuts, and the share of padding under the
configured batching versus plain random batching: what is needed to choose `max_length` and the batching.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import yaml
from jsonargparse import ArgumentParser

from qlora_lit.data.collate import padded_width
from qlora_lit.data.datamodule import KoAlpacaDataModule
from qlora_lit.data.sampler import EpochBatchSampler
from qlora_lit.data.token_cache import read_tokens
from qlora_lit.errors import ConfigError

PERCENTILES = {"p50": 50, "p90": 90, "p95": 95, "p99": 99, "max": 100}


def data_stats(argv: list[str], prog: str = "python -m qlora_lit data-stats") -> dict:
    """Print token statistics of the training data of a fit config; the same `--data.*` overrides as `fit` apply.

        python -m qlora_lit data-stats --config configs/base.yaml [--config more.yaml] [--data.max_length 1024 ...]

    Returns the report (what is printed, as a dict).
    """
    parser = ArgumentParser(prog=prog, description=inspect.getdoc(data_stats).split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--config", action="append", required=True, help="the YAML file(s) given to fit, in order")
    parser.add_class_arguments(KoAlpacaDataModule, "data")
    parser.set_defaults({f"data.{key}": value for key, value in fit_data_settings(config_files(argv)).items()})
    data = parser.instantiate_classes(parser.parse_args(argv)).data
    data.setup()
    report = collect(data)
    print(format_report(data, report))
    return report


def config_files(argv: list[str]) -> list[str]:
    """The values of every `--config FILE` (or `--config=FILE`) in a command line, in order."""
    files = []
    for flag, value in zip(argv, [*argv[1:], None], strict=False):  # no arguments: none (the parser says more)
        if flag == "--config" and value is not None:
            files.append(value)
        elif flag.startswith("--config="):
            files.append(flag.removeprefix("--config="))
    return files


MODEL_LINKS = {"model_name_or_path": "tokenizer", "trust_remote_code": "trust_remote_code"}
"""model settings -> the data settings that `fit` links them to (cli.QLoRACLI.add_arguments_to_parser)."""


def fit_data_settings(configs: list[str]) -> dict:
    """The `data:` settings of fit configs (later files win), with the tokenizer and trust_remote_code linked to the
    model's as `fit` does."""
    data: dict = {}
    for config in configs:
        settings = read_config(config)
        data.update(_init_args(settings.get("data")))
        model = _init_args(settings.get("model"))
        data.update({linked: model[setting] for setting, linked in MODEL_LINKS.items() if model.get(setting)})
    unknown = sorted(set(data) - set(inspect.signature(KoAlpacaDataModule).parameters))
    if unknown:
        raise ConfigError(f"{', '.join(configs)}: unknown data settings {unknown}")
    return data


def read_config(config: str) -> dict:
    path = Path(config).expanduser()
    if not path.is_file():
        raise ConfigError(f"config file {config!r} {'is a folder' if path.is_dir() else 'does not exist'}")
    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {config!r} is not valid YAML: {err}") from None
    if not isinstance(settings, dict | None):
        raise ConfigError(f"config file {config!r} must hold a mapping of sections (data:, model:, ...)")
    return settings or {}


def _init_args(section: dict | None) -> dict:
    """A config section's settings, whether written plainly or as `class_path` + `init_args`."""
    section = dict(section or {})
    return dict(section.get("init_args") or {}) if "class_path" in section else section


def collect(data: KoAlpacaDataModule) -> dict:
    """The statistics of a set-up data module, as a dict (what `format_report` prints)."""
    rows, _ = read_tokens(data.cache_path)
    total = np.array([len(row.tokens.ids) for row in rows])
    response = np.array([sum(end - start for start, end in row.tokens.trained) for row in rows])
    lengths = {"prompt": total - response, "response": response, "total": total}
    _, item_lengths, _ = data.train_items()
    example_lengths = [len(example["input_ids"]) for example in data.train_set]
    return {
        **data.stats,
        "token_lengths": {name: percentiles(values) for name, values in lengths.items()},
        "turns_per_row": percentiles(np.array([row.turns for row in rows])),
        "overlong_share": float((lengths["total"] > data.max_length).mean()),
        "padding_configured": padding_fraction(data, item_lengths, data.group_by_length),
        "padding_random": padding_fraction(data, example_lengths, False),
    }


def percentiles(values: np.ndarray) -> dict[str, int]:
    return {name: round(float(np.percentile(values, q))) for name, q in PERCENTILES.items()}


def padding_fraction(data: KoAlpacaDataModule, lengths: list[int], group_by_length: bool) -> float:
    """Share of padding tokens in one epoch of batches of `lengths` (examples or packed rows), as the sampler and
    collators would build them."""
    sampler = EpochBatchSampler(lengths, data.batch_size, seed=data.seed, group_by_length=group_by_length)
    real = padded = 0
    for batch in sampler.all_batches():
        widest = max(lengths[i] for i in batch)
        padded += padded_width(widest, data.pad_to_multiple_of) * len(batch)
        real += sum(lengths[i] for i in batch)
    return 1 - real / padded


def format_report(data: KoAlpacaDataModule, report: dict) -> str:
    batching = f"packed rows of {data.pack_length} tokens" if data.pack_length else "examples"
    batching += ", grouped by length" if data.group_by_length else ""
    overlong = report["overlong"]
    lines = [
        f"data {data.path} | tokenizer {data.tokenizer_name} | prompt format {data.prompt_format}",
        f"rows read            {report['rows_read']:>8}",
        f"empty dropped        {report['empty_dropped']:>8}",
        f"bad rows skipped     {report['bad_rows_skipped']:>8}   (data.bad_rows: {data.bad_rows})",
        f"duplicates dropped   {report['duplicates_dropped']:>8}",
        f"rows kept            {report['rows_kept']:>8}   ({report['multi_turn_rows']} of several turns, "
        f"{report['turns']} assistant turns)",
        f"longer than max_length={data.max_length}: {overlong} ({report['overlong_share']:.1%}) -> "
        f"{report['turns_dropped_rows']} shortened by {report['turns_dropped']} earlier turns, truncated "
        f"{report['truncated']}, dropped {report['overlong_dropped'] + report['prompt_too_long_dropped']}",
        f"  (overlong: {data.overlong}; a row whose prompt alone fills max_length is always dropped)",
        f"training examples per epoch / validation rows: {report['train_rows']} / {report['val_rows']}",
        *source_lines(report["sources"]),
        "",
        "tokens   " + "".join(f"{name:>8}" for name in PERCENTILES),
    ]
    for name, values in report["token_lengths"].items():
        lines.append(f"{name:<9}" + "".join(f"{value:>8}" for value in values.values()))
    lines.append("turns    " + "".join(f"{value:>8}" for value in report["turns_per_row"].values()))
    lines += [
        "",
        f"padding: {report['padding_configured']:.1%} with the configured batching (batches of {data.batch_size} "
        f"{batching}), {report['padding_random']:.1%} with plain random batches of {data.batch_size} examples",
    ]
    return "\n".join(lines)


def source_lines(sources: list[dict]) -> list[str]:
    """Per source, when there are several: rows, validation rows and training examples per epoch (its share)."""
    if len(sources) < 2:
        return []
    per_epoch = sum(source["per_epoch"] for source in sources)
    lines = []
    for source in sources:
        setting = "".join(f", {key} {source[key]}" for key in ("weight", "fraction") if key in source)
        lines.append(
            f"  {source['path']}{setting}: {source['rows']} rows, {source['val_rows']} validation, "
            f"{source['per_epoch']} training examples per epoch ({source['per_epoch'] / max(per_epoch, 1):.0%})"
        )
    return lines

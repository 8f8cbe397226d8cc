"""The command line.

python -m qlora_lit fit|validate|test|predict --config configs/X.yaml [--key value ...]   (LightningCLI)
python -m qlora_lit <plain command> [--key value ...]                                     (PLAIN_COMMANDS)
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import sys
from pathlib import Path
from typing import Any

from jsonargparse import auto_cli, set_parsing_settings
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from qlora_lit import ddp
from qlora_lit.callbacks import AdapterExport, DataStatsExport, PredictionWriter, run_dir
from qlora_lit.checkpoint_io import AtomicCheckpointIO
from qlora_lit.data import KoAlpacaDataModule
from qlora_lit.disk_space import ensure_free_space, ensure_writable, run_size_estimate
from qlora_lit.errors import ConfigError, TrainingError
from qlora_lit.model import count_lora_parameters
from qlora_lit.module import QLoRAModule
from qlora_lit.monitor import TrainingMonitor
from qlora_lit.preemption import PreemptionCheckpoint
from qlora_lit.progress import LoggedMetricsBar
from qlora_lit.rank_watch import RankWatch, wait_for_verdict
from qlora_lit.ranks import rank_layout
from qlora_lit.resume import (
    ResumedRun,
    checkpoint_to_resume,
    continue_newest_run,
    newest_last_checkpoint,
    no_logger,
    refuse_a_used_run_folder,
)
from qlora_lit.run_folder import release_runs, take_new_run_folder
from qlora_lit.samples import SampleGenerations
from qlora_lit.text_log import SaveAndLogConfig
from qlora_lit.trainer_settings import check_run_settings, check_trainer_settings


def trainer_defaults() -> dict:
    return {
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            # No hp_metric: its placeholder -1 at step 0 would be logged again by every resumed process.
            "init_args": {"save_dir": "runs", "name": "qlora_lit", "default_hp_metric": False},
        },
        # The data module's own sampler splits batches across ranks and resumes mid-epoch.
        "use_distributed_sampler": False,
        # Always present: the adapter is the run's product, the data statistics and the learning rate are worth
        # having for every run, and a kill signal must end in a resumable checkpoint.
        "callbacks": [
            AdapterExport(),
            DataStatsExport(),
            LearningRateMonitor(logging_interval="step"),
            PreemptionCheckpoint(),
            ResumedRun(),
        ],
    }


# Commands outside Lightning's loop: plain functions whose typed, documented arguments are the command line.
PLAIN_COMMANDS: dict[str, str] = {
    "generate": "qlora_lit.generate:generate",
    "chat": "qlora_lit.chat:chat",
    "export": "qlora_lit.export:export",
    "data-stats": "qlora_lit.data.stats:data_stats",
}


DESCRIPTION = (
    "QLoRA fine-tuning of causal language models with Lightning: fit, validate, test, predict (below), and "
    f"{', '.join(PLAIN_COMMANDS)} (python -m qlora_lit COMMAND --help)."
)


class QLoRACLI(LightningCLI):
    """LightningCLI with the tokenizer linked to the model, a configurable checkpoint policy and a rich progress bar."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.model_name_or_path", "data.tokenizer")
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(PredictionWriter, "predictions")  # used by `predict` only
        # Always on, and configurable in the YAML (`monitor:`, `samples:`), unlike instances in trainer_defaults.
        parser.add_lightning_class_args(TrainingMonitor, "monitor")
        parser.add_lightning_class_args(SampleGenerations, "samples")
        parser.add_lightning_class_args(RankWatch, "rank_watch")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val_loss",
                "checkpoint.mode": "min",
                "checkpoint.save_top_k": 3,
                "checkpoint.save_last": True,
                "checkpoint.filename": "step{step:06d}-val_loss{val_loss:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def _parse_ckpt_path(self) -> None:
        """LightningCLI lays a checkpoint's hyperparameters over the command line and configs; qlora_lit does not.
        What the user passes is what runs (and what config.yaml records): a checkpoint from elsewhere cannot turn on
        trust_remote_code or swap the base model, and a resume takes the learning rate or schedule the user gives.
        The settings that decide the adapters' shapes are compared with the checkpoint's when it is loaded
        (QLoRAModule.on_load_checkpoint)."""

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else None
        if self.subcommand == "fit":
            checkpoint = config.get("checkpoint") or {}
            check_run_settings(
                config.trainer.get("val_check_interval"),
                checkpoint.get("save_top_k"),
                checkpoint.get("monitor"),
                config.data.get("path"),
                config.trainer.get("accumulate_grad_batches"),
            )
        resumes = config.ckpt_path in ("last", "best") if config else False
        if self.subcommand == "fit" and resumes and config.checkpoint.dirpath is None:
            continue_newest_run(config.trainer.logger, config.ckpt_path)  # before the logger exists: it names the run
        if self.subcommand == "fit" and config.ckpt_path is None:
            refuse_a_used_run_folder(config.trainer.logger, config.trainer.get("default_root_dir"))

    def before_fit(self) -> None:
        layout = rank_layout(self.trainer)
        if layout:  # every rank says where it stands (qlora_lit/ranks.py says why)
            print(layout, file=sys.stderr, flush=True)
        if self.trainer.is_global_zero:  # rank 0 writes the run's files (another rank would name the next version)
            folder = run_dir(self.trainer)
            save_dir = "trainer.logger.init_args.save_dir (or trainer.default_root_dir)"
            ensure_writable(folder, "the run's outputs", save_dir)
            lora = count_lora_parameters(self.model.model_name_or_path, self.model.lora, self.model.trust_remote_code)
            ensure_free_space(folder, run_size_estimate(lora, self.trainer.checkpoint_callback))
        self.check_ckpt_path()

    def before_validate(self) -> None:
        self.check_ckpt_path()

    def before_test(self) -> None:
        self.check_ckpt_path()

    def before_predict(self) -> None:
        writers = [callback for callback in self.trainer.callbacks if isinstance(callback, PredictionWriter)]
        output = writers[0].output if writers else None
        if output and Path(output).is_dir():  # it was found at the end, after every prompt had been answered
            raise ConfigError(
                f"predictions.output {output} is a folder; give the path of a JSONL file for the answers, e.g. "
                f"--predictions.output {Path(output) / 'predictions.jsonl'}"
            )
        if self.trainer.is_global_zero and writers:  # before the model loads
            ensure_writable(writers[0].output_path(self.trainer).parent, "the predictions", "predictions.output")
        self.check_ckpt_path()

    def check_ckpt_path(self) -> None:
        """`--ckpt_path` checked before the model loads: `last` and `best` resolved to a whole checkpoint of the run
        (qlora_lit.resume.checkpoint_to_resume), a file refused with one message unless it is a whole checkpoint that
        loads with `torch.load(weights_only=True)` (the default here; `--weights_only false` for other files). Every
        rank resolves it alike (they read the same files)."""
        args = self.config_init[self.subcommand]
        if args.get("weights_only") is None:
            # Checkpoints hold tensors and plain containers only: load them without running pickled code.
            args["weights_only"] = True
        callback = self.trainer.checkpoint_callback
        if callback is not None and callback.dirpath:
            folder = Path(callback.dirpath)
        elif self.subcommand == "fit" or args.get("ckpt_path") not in ("last", "best") or not self.trainer.loggers:
            folder = run_dir(self.trainer) / "checkpoints"  # fit: the run continue_newest_run chose
        else:  # validate, test, predict: the newest run of this save_dir and name, not their own new folder
            newest = newest_last_checkpoint(Path(self.trainer.loggers[0].root_dir))
            folder = newest.parent if newest else run_dir(self.trainer) / "checkpoints"
        monitor = callback.monitor if callback is not None else None
        args["ckpt_path"] = checkpoint_to_resume(args.get("ckpt_path"), folder, monitor, args["weights_only"])

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Refuse impossible settings, add a rich progress bar unless the config has another or turns it off
        (Lightning refuses both at once), and write checkpoints atomically (AtomicCheckpointIO) unless the config
        names another CheckpointIO."""
        trainer_config = self._get(self.config_init, "trainer", default={})
        check_trainer_settings(
            trainer_config.get("accelerator", "auto"),
            trainer_config.get("devices", "auto"),
            trainer_config.get("num_nodes", 1),
            trainer_config.get("accumulate_grad_batches", 1),
        )
        callbacks = trainer_config.get("callbacks") or []
        wants_bar = trainer_config.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(callback, ProgressBar) for callback in callbacks):
            trainer_config["callbacks"] = [*callbacks, LoggedMetricsBar()]
        plugins = trainer_config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            trainer_config["plugins"] = [*plugins, AtomicCheckpointIO()]
        if self.subcommand:  # before Lightning numbers the run's folder: two runs started together, two folders
            take_new_run_folder(trainer_config.get("logger"))
        if no_logger(trainer_config.get("logger")):  # Lightning stops a LearningRateMonitor without a logger
            defaults = self.trainer_defaults["callbacks"]
            self.trainer_defaults["callbacks"] = [
                item for item in defaults if not isinstance(item, LearningRateMonitor)
            ]
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as err:  # Lightning's word on other settings, no traceback
            raise ConfigError(f"trainer settings: {err}") from None


LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def unknown_command_message(name: str) -> str:
    """LightningCLI's own message listed its four commands only, as if generate, export and data-stats did not exist."""
    commands = [*LIGHTNING_COMMANDS, *PLAIN_COMMANDS]
    close = difflib.get_close_matches(name, commands, n=1)
    guess = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown command {name!r}: the commands are {', '.join(commands)}{guess} (python -m qlora_lit --help)"


def run_plain_command(name: str, args: list[str]) -> Any:
    module_name, function_name = PLAIN_COMMANDS[name].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    prog = f"python -m qlora_lit {name}"
    if list(inspect.signature(function).parameters) == ["argv", "prog"]:  # reads fit's config itself (data-stats)
        return function(args, prog)
    # as_positional=False: required arguments are `--name value` options too, like everything else on this CLI.
    return auto_cli(function, args=args, prog=prog, as_positional=False, allow_abbrev=False)


def shows_help(argv: list[str]) -> bool:
    """Whether the command line asks for the settings' explanations (--help, --X.help, --print_config=comments)."""
    return any(arg in ("-h", "--help") or arg.endswith(".help") or arg.startswith("--print_config") for arg in argv)


def cli_main(args: list[str] | None = None, run: bool = True) -> Any:
    """Run the CLI; user mistakes end with one message on stderr and exit status 2.

    Args:
        args: command-line arguments (default: sys.argv[1:]).
        run: run the subcommand; False only parses and instantiates (then `args` has no subcommand).
    """
    argv = sys.argv[1:] if args is None else list(args)
    # Settings dataclasses (LoraArgs, KoAlpacaDataModule, ...) explain each field in a docstring beneath it. Reading
    # those parses each class's source (about 0.7 s per command line), so only what prints help pays for it.
    set_parsing_settings(docstring_parse_attribute_docstrings=shows_help(argv))
    ddp.register()
    try:
        if argv and argv[0] in PLAIN_COMMANDS:
            return run_plain_command(argv[0], argv[1:])
        if argv and not argv[0].startswith("-") and argv[0] not in LIGHTNING_COMMANDS:
            raise ConfigError(unknown_command_message(argv[0]))
        return QLoRACLI(
            QLoRAModule,
            KoAlpacaDataModule,
            trainer_defaults=trainer_defaults(),
            seed_everything_default=42,
            save_config_callback=SaveAndLogConfig,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            parser_kwargs={"prog": "python -m qlora_lit", "description": DESCRIPTION, "allow_abbrev": False},
            args=args,
            run=run,
        )
    except ConfigError as err:
        print(f"qlora_lit: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingError as err:
        print(f"qlora_lit: training stopped: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as err:
        wait_for_verdict(err)  # another rank went away: its watcher names it and ends this process
        raise
    finally:
        release_runs()

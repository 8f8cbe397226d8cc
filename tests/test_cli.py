"""The command line: every shipped config parses, mistakes get one clear message, the demo trains end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.fabric.accelerators.cuda
import pytest
import torch
from conftest import DEMO_CONFIG, TINY_MODEL, shown_by_tensorboard
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qlora_lit.cli import cli_main
from qlora_lit.data.stats import fit_data_settings
from qlora_lit.flops import peak_tflops
from qlora_lit.samples import DEFAULT_PROMPTS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["qlora_lit"])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model_name_or_path:" in printed


def test_help_names_every_command_and_how_to_run_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--help"])
    assert exit_info.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert shown.startswith("usage: python -m qlora_lit ") and "{fit,validate,test,predict}" in shown
    assert "generate, chat, export, data-stats (python -m qlora_lit COMMAND --help)" in shown


@pytest.mark.parametrize(("typed", "guess"), [("genrate", "; did you mean 'generate'?"), ("xyz", " (python -m")])
def test_an_unknown_command_lists_every_command(typed, guess, capsys):
    """Lightning's parser listed fit, validate, test and predict only."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main([typed, "--prompt", "hi"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert (
        f"unknown command {typed!r}: the commands are fit, validate, test, predict, generate, chat, export, data-stats"
        in error
    )
    assert guess in error


def test_tokenizer_follows_the_model():
    cli = cli_main(["--config", str(ROOT / "configs/demo.yaml"), "--model.model_name_or_path", "some/model"], run=False)
    assert cli.datamodule.tokenizer_name == "some/model"


def test_overrides_reach_the_resolved_config(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(ROOT / "configs/demo.yaml"), "--model.lora.r", "16", "--print_config"])
    assert "r: 16" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--model.lora.rank", "4"], "rank"),
        (["--model.lora.r", "0"], "lora.r must be a positive integer"),
        (["--model.lora.dropout", "1.5"], "lora.dropout must be in [0, 1)"),
        (["--model.lora.alpha", "0"], "lora.alpha must be a positive number, got 0.0 (0 would train nothing)"),
        (["--model.optimizer.lr", ".nan"], "optimizer.lr must be a positive number, got nan"),
        (["--data.pad_to_multiple_of", "0"], "data.pad_to_multiple_of must be >= 1 (1: no rounding), got 0"),
        (["--data.num_workers=-1"], "data.num_workers must be >= 0 (0: load in the main process), got -1"),
        (["--model.quantization.load_in_8bit", "true"], "load_in_4bit and load_in_8bit are both true"),
        (["--model.attn_implementation", "flash"], "attn_implementation"),
        (["--data.overlong", "cut"], "overlong"),
        (["--data.pack_length", "100"], "data.pack_length=100 must be 0/null (no packing) or >= data.max_length=256"),
        (["--data.encoding", "utf-9"], "data.encoding 'utf-9' is not an encoding"),
        (["--data.columns", "{question: instruction}"], "data.columns maps 'question'"),
        # impossible trainer settings, refused before Lightning builds the trainer
        (["--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches must be a whole number >= 1"),
        (["--trainer.accumulate_grad_batches", "-2"], "(micro-batches per optimizer step), got -2"),
        (["--trainer.devices", "0"], "trainer.devices must be >= 1, -1 (every GPU) or auto, got 0"),
        (["--trainer.devices", "-3"], "trainer.devices must be >= 1, -1 (every GPU) or auto, got -3"),
        (["--trainer.num_nodes", "0"], "trainer.num_nodes must be >= 1, got 0"),
        (["--trainer.val_check_interval", "0"], "trainer.val_check_interval must be > 0 (training batches"),
        # a validation inside an optimizer step saved checkpoints without its accumulated gradients: inexact resumes
        (
            ["--trainer.accumulate_grad_batches", "3", "--trainer.val_check_interval", "20"],
            "trainer.val_check_interval=20 training batches is not a multiple of trainer.accumulate_grad_batches=3: "
            "its validations (and their checkpoints) would fall inside an optimizer step, whose accumulated gradients "
            "no checkpoint keeps, so a resumed run would differ. Use 18 or 21",
        ),
        (
            ["--trainer.accumulate_grad_batches", "2", "--trainer.val_check_interval", "0.5"],
            "trainer.val_check_interval=0.5 (a fraction of an epoch) with trainer.accumulate_grad_batches=2",
        ),
        (["--checkpoint.save_top_k=-5"], "checkpoint.save_top_k must be -1 (keep all), 0 (none) or more, got -5"),
        (["--checkpoint.monitor", "val_los"], "checkpoint.monitor 'val_los' is not a metric this run logs"),
        (["--model.lora.target_modules", "foo_proj"], "lora settings cannot be applied to 'builtin:tiny-llama'"),
        # was 180 s without a word (peft built the adapters in memory to count them)
        (
            ["--model.lora.r", "10000000"],
            "lora.r=10000000 is more than any adapted layer can use: the largest, model.layers.0",
        ),
        (["--trainer.strategy", "dpp"], "trainer settings: You selected an invalid strategy name: `strategy='dpp'`"),
    ],
)
def test_bad_settings_fail_with_a_message(override, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(ROOT / "configs/demo.yaml"), *override])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--trainer.accelerator", "gpu"], "trainer.accelerator=gpu but no CUDA GPU is visible here"),
        (["--trainer.devices", "-1"], "trainer.devices=-1 means every GPU and there is none here"),
    ],
)
def test_asking_for_gpus_where_there_are_none_fails_with_a_message(override, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(ROOT / "configs/demo.yaml"), *override])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_more_gpus_than_the_machine_has_fail_with_a_message(capsys, monkeypatch):
    monkeypatch.setattr(lightning.fabric.accelerators.cuda, "num_cuda_devices", lambda: 1)  # a one-GPU machine
    gpus = ["--trainer.accelerator", "gpu", "--trainer.devices", "2"]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(ROOT / "configs/demo.yaml"), *gpus])
    assert exit_info.value.code == 2
    assert "trainer.devices=2 but this machine has 1 GPU: use trainer.devices 1 or fewer" in capsys.readouterr().err


@pytest.mark.slow
def test_a_training_split_smaller_than_a_batch_per_device_is_refused(tmp_path):
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    result = run_cli("fit", "--config", "configs/demo.yaml", *ddp, "--data.val_size", "255", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    expected = "the training split has 5 rows, 1 batch(es) of data.batch_size=8, fewer than the 2 devices"
    assert expected in result.stderr and "zero steps" in result.stderr
    assert "Traceback" not in result.stderr


def test_bf16_true_with_a_quantized_base_is_refused(tmp_path, capsys):
    save_dir = ["--trainer.logger.init_args.save_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(ROOT / "configs/demo.yaml"), "--trainer.precision", "bf16-true", *save_dir])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "trainer.precision=bf16-true casts the whole model, which 4/8-bit weights cannot take" in error
    assert "trainable parameters" not in error  # refused before the base was loaded


def test_missing_data_file_is_one_clear_message(tmp_path):
    missing = str(tmp_path / "missing.jsonl")
    result = run_cli("fit", "--config", "configs/demo.yaml", "--data.path", missing, cwd=tmp_path)
    assert result.returncode == 2
    assert f"qlora_lit: error: data file '{tmp_path / 'missing.jsonl'}' does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    args = [str(ROOT / a) if a.startswith("configs/") else a for a in args]
    return subprocess.run(
        [sys.executable, "-m", "qlora_lit", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def events(log_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})  # 0: keep every text event
    accumulator.Reload()
    return accumulator


def scalars(log: EventAccumulator, tag: str) -> list[float]:
    return [event.value for event in log.Scalars(tag)]


def texts(log: EventAccumulator, tag: str) -> dict[int, str]:
    logged = log.Tensors(f"{tag}/text_summary")
    return {event.step: shown_by_tensorboard(event.tensor_proto.string_val[0].decode()) for event in logged}


# The TensorBoard story of a run (README "Monitoring"); the last ones need a GPU.
SERIES = [
    "train_loss",
    "val_loss",
    "val_ppl",
    "lr-PagedAdamW8bit",
    "epoch",
    "train/grad_norm",
    "train/padding_fraction",
    "throughput/tokens_per_s",
    "throughput/label_tokens_per_s",
    "throughput/samples_per_s",
    "throughput/step_time_s",
]
GPU_SERIES = ["throughput/mfu", "memory/peak_allocated_gib", "memory/peak_reserved_gib"]


def test_every_metric_checkpoint_monitor_accepts_is_one_the_run_logs_at_every_validation():
    from qlora_lit.trainer_settings import MONITORABLE

    assert set(MONITORABLE) == {"train_loss", "val_loss", "val_ppl"}  # TrainingMonitor's series: see below


@pytest.mark.parametrize(
    "metric", ["throughput/mfu", "train/grad_norm", "throughput/tokens_per_s", "memory/peak_reserved_gib"]
)
def test_a_monitor_not_logged_at_every_validation_is_refused_before_loading(metric, tmp_path, capsys, monkeypatch):
    """They are logged every log_every_n_steps optimizer steps (mfu only where the GPU's peak is known): a validation
    before the first log stopped the run at its checkpoint with Lightning's MisconfigurationException."""
    monkeypatch.setattr("qlora_lit.module.load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(
            [
                "fit",
                "--config",
                DEMO_CONFIG,
                "--checkpoint.monitor",
                metric,
                "--trainer.logger.init_args.save_dir",
                str(tmp_path),
            ]
        )
    assert exit_info.value.code == 2
    error = " ".join(capsys.readouterr().err.split())
    assert f"checkpoint.monitor '{metric}' is logged only every trainer.log_every_n_steps optimizer steps" in error
    assert "choose one of val_loss, val_ppl, train_loss, val_loss/<source> (with several data.path entries)" in error


@pytest.mark.slow
def test_a_sources_validation_loss_can_rank_the_checkpoints(tmp_path):
    """README "Monitoring": with several data.path entries each source's `val_loss/<name>` is logged; it was refused."""
    args = ["--config", str(ROOT / "configs/demo_chat.yaml"), "--trainer.max_steps", "2"]
    args += ["--trainer.val_check_interval", "2", "--samples.prompts", "[]", "--trainer.enable_progress_bar", "false"]
    args += ["--trainer.logger.init_args.save_dir", str(tmp_path), "--checkpoint.monitor", "val_loss/ko_chat_sample"]
    cli = cli_main(["fit", *args])
    checkpoint = cli.trainer.checkpoint_callback
    assert Path(checkpoint.best_model_path).is_file()
    assert checkpoint.best_model_score == cli.trainer.callback_metrics["val_loss/ko_chat_sample"]
    with pytest.raises(SystemExit):  # a source the run does not have
        cli_main(["fit", *args, "--checkpoint.monitor", "val_loss/ko_chat"])


@pytest.mark.slow
def test_a_fit_without_a_logger_trains_saves_and_resumes_in_default_root_dir(tmp_path, capsys, monkeypatch):
    """`--trainer.logger false` ended in Lightning's "Cannot use `LearningRateMonitor` callback with `Trainer` that has
    no logger" once the model had loaded."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    args = ["fit", "--config", DEMO_CONFIG, "--trainer.logger", "false", "--trainer.default_root_dir", str(run)]
    args += ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--samples.prompts", "[]"]
    cli_main([*args, "--trainer.enable_progress_bar", "false"])
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert not list(tmp_path.rglob("events.out.tfevents.*")) and list(tmp_path.iterdir()) == [run]
    with pytest.raises(SystemExit) as exit_info:  # a second fit there would overwrite it
        cli_main(args)
    assert exit_info.value.code == 2
    message = (
        f"{run} already holds a run: continue it with --ckpt_path last, or choose another trainer.default_root_dir"
    )
    assert message in capsys.readouterr().err
    cli = cli_main([*args, "--trainer.max_steps", "4", "--ckpt_path", "last", "--trainer.enable_progress_bar", "false"])
    assert cli.trainer.global_step == 4
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


@pytest.mark.slow
def test_demo_fit_end_to_end(tmp_path):
    result = run_cli("fit", "--config", "configs/demo.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "demo" / "version_0"
    adapter = {p.name for p in (run / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "qlora_lit_config.yaml"} <= adapter
    assert (run / "checkpoints" / "last.ckpt").is_file()

    log = events(run)
    val_loss = scalars(log, "val_loss")
    assert len(val_loss) == 3  # validations at 20, 40 and 60 steps
    assert val_loss[-1] < val_loss[0]
    for tag in SERIES:
        assert scalars(log, tag), tag
    assert len(scalars(log, "throughput/tokens_per_s")) == 60 // 5  # every log_every_n_steps
    assert all(0 < fraction < 1 for fraction in scalars(log, "train/padding_fraction"))
    assert not set(GPU_SERIES) & set(log.Tags()["scalars"])  # a CPU run: no peak FLOP/s known, no CUDA memory

    assert "model_name_or_path: builtin:tiny-llama" in texts(log, "config")[0]
    for index, prompt in enumerate(DEFAULT_PROMPTS):
        samples = texts(log, f"samples/{index}")
        assert sorted(samples) == [0, 20, 40, 60]  # the sanity check, then each validation
        assert all(prompt in text for text in samples.values())
    stats = json.loads((run / "data_stats.json").read_text())
    assert stats["rows_read"] == 263 and stats["train_rows"] + stats["val_rows"] <= stats["rows_kept"]
    assert json.loads((run / "adapter" / "data_stats.json").read_text()) == stats
    assert "data builtin:koalpaca_sample.jsonl: {'rows_read': 263" in result.stderr + result.stdout  # logged at start


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_demo_fit_on_gpu_adds_mfu_and_memory(tmp_path):
    gpu = ["--trainer.accelerator", "gpu", "--trainer.precision", "bf16-mixed", "--model.quantization.compute_dtype"]
    short = ["--trainer.max_steps", "20", "--trainer.val_check_interval", "10"]
    unknown_peak = ["--monitor.peak_tflops", "100"] if peak_tflops(torch.cuda.get_device_name()) is None else []
    result = run_cli("fit", "--config", "configs/demo.yaml", *gpu, "bfloat16", *short, *unknown_peak, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = events(tmp_path / "runs" / "demo" / "version_0")
    for tag in SERIES + GPU_SERIES:
        assert scalars(log, tag), tag
    assert all(0 < mfu < 1 for mfu in scalars(log, "throughput/mfu"))
    peaks = zip(scalars(log, "memory/peak_allocated_gib"), scalars(log, "memory/peak_reserved_gib"), strict=True)
    assert all(0 < allocated <= reserved for allocated, reserved in peaks)
    assert sorted(texts(log, "samples/0")) == [0, 10, 20]


def test_data_stats_command_reads_the_fit_config(capsys):
    report = cli_main(["data-stats", "--config", str(ROOT / "configs/demo.yaml"), "--data.group_by_length", "true"])
    printed = capsys.readouterr().out
    for line in ("rows read", "duplicates dropped", "longer than max_length=256", "tokens", "prompt", "response"):
        assert line in printed
    assert report["rows_read"] == 263 and report["duplicates_dropped"] == 3
    lengths = report["token_lengths"]
    assert lengths["prompt"]["p50"] < lengths["total"]["p50"] <= lengths["total"]["max"]
    assert 0 < report["overlong_share"] < 0.1
    assert report["padding_configured"] < report["padding_random"] / 2  # grouped by length vs plain random
    packed = cli_main(["data-stats", "--config", str(ROOT / "configs/demo.yaml"), "--data.pack_length", "1024"])
    assert packed["padding_configured"] < 0.05 < packed["padding_random"]


def test_data_stats_takes_fit_configs_layered_and_the_data_overrides_of_fit(tmp_path, capsys):
    """base.yaml names hub ids; layered with lowmem.yaml and overridden as `fit` would be, it runs offline."""
    rows = [{"instruction": f"질문 {i}", "output": f"답 {i}"} for i in range(40)]
    data_file = tmp_path / "my.jsonl"
    data_file.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows), encoding="utf-8")
    args = ["data-stats", "--config", str(ROOT / "configs/base.yaml"), f"--config={ROOT / 'configs/lowmem.yaml'}"]
    args += ["--data.path", str(data_file), "--data.tokenizer", TINY_MODEL, "--data.max_length", "64"]
    report = cli_main(args)
    assert report["rows_read"] == 40 and report["duplicates_dropped"] == 0
    assert f"data {data_file} | tokenizer {TINY_MODEL}" in capsys.readouterr().out


def test_data_stats_links_the_models_settings_as_fit_does(tmp_path):
    """model.trust_remote_code: true was ignored, and the tokenizer's error then advised setting exactly that."""
    config = tmp_path / "fit.yaml"
    config.write_text(f"model:\n  model_name_or_path: {TINY_MODEL}\n  trust_remote_code: true\n")
    settings = fit_data_settings([str(config)])
    assert (settings["tokenizer"], settings["trust_remote_code"]) == (TINY_MODEL, True)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "is a folder"),
        ("data: [\n", "is not valid YAML"),
        ("- data\n- model\n", "must hold a mapping of sections"),
    ],
)
def test_data_stats_names_a_config_it_cannot_read(tmp_path, capsys, content, message):
    config = tmp_path / "fit.yaml"
    if content is None:
        config.mkdir()
    else:
        config.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["data-stats", "--config", str(config)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_an_abbreviated_option_is_refused_not_taken_for_a_longer_one(capsys):
    """argparse would read --data.max_len as --data.max_length: a typo must not set another key."""
    for command in ("fit", "data-stats"):
        with pytest.raises(SystemExit):
            cli_main([command, "--config", DEMO_CONFIG, "--data.max_len", "5"])
        assert "unrecognized arguments: --data.max_len" in capsys.readouterr().err


def test_lr_nan_in_a_yaml_file_is_one_message(tmp_path, capsys):
    config = tmp_path / "nan.yaml"
    config.write_text("model:\n  optimizer:\n    lr: .nan\n")
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(ROOT / "configs/demo.yaml"), "--config", str(config)])
    assert "optimizer.lr must be a positive number, got nan" in capsys.readouterr().err


def test_an_empty_prompt_is_refused(capsys):
    with pytest.raises(SystemExit):
        cli_main(["generate", "--model", "builtin:tiny-llama", "--prompt", "  "])
    assert "--prompt is empty" in capsys.readouterr().err


def test_generate_output_that_is_a_folder_is_refused_before_loading(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "안녕?"}\n', encoding="utf-8")
    args = ["--prompts_file", str(prompts), "--output", str(tmp_path)]
    with pytest.raises(SystemExit):  # the model would not load either: the output is checked first
        cli_main(["generate", "--model", "no/such-model", *args])
    assert f"--output {str(tmp_path)!r} is a folder" in capsys.readouterr().err


def test_data_stats_without_arguments_asks_for_the_config(capsys):
    """It stopped with `zip() argument 2 is longer than argument 1` before the parser could say what was missing."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["data-stats"])
    assert exit_info.value.code == 2
    assert "--config" in capsys.readouterr().err

"""predict: batched generation through Lightning over a prompts file, on one or several processes, as JSONL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_lit.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    {"instruction": "한국의 수도는?"},
    {"instruction": "다음 문장을 요약해줘.", "input": "서울은 한국의 수도이다.", "id": 7},
    {"instruction": "안녕?"},
    {"instruction": "김치찌개 끓이는 법을 알려줘."},
    {"instruction": "하늘은 왜 파래?"},
]
GREEDY = ["--generation.do_sample", "false", "--generation.max_new_tokens", "6"]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["qlora_lit"])


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in PROMPTS), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def generated(trained_run, prompts) -> list[str]:
    """What `generate` answers with the same base, adapter, batches of 2 and greedy decoding."""
    adapter = str(trained_run[0] / "adapter")
    return cli_main(["generate", "--adapter", adapter, "--prompts_file", prompts, "--batch_size", "2", *GREEDY])


def predict_args(run: Path, prompts: str, output: Path) -> list[str]:
    return [
        "predict",
        "--config", str(run / "config.yaml"),
        "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
        "--data.predict_path", prompts,
        "--data.batch_size", "2",
        "--predictions.output", str(output),
        "--trainer.enable_progress_bar", "false",
        *[f"--model.{arg[2:]}" if arg.startswith("--") else arg for arg in GREEDY],
    ]  # fmt: skip


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_predict_writes_the_answers_of_generate_in_file_order(trained_run, prompts, generated, tmp_path):
    output = tmp_path / "predictions.jsonl"
    cli_main(predict_args(trained_run[0], prompts, output))
    assert read_jsonl(output) == [{**row, "generated": answer} for row, answer in zip(PROMPTS, generated, strict=True)]
    assert not list(tmp_path.glob(".predictions.jsonl*"))  # the per-rank parts are gone


def test_an_unwritable_output_is_one_message_before_loading(trained_run, prompts, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("qlora_lit.module.load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(predict_args(trained_run[0], prompts, tmp_path / "a-file" / "answers.jsonl"))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"cannot write the predictions to {tmp_path / 'a-file'}" in error and "Point predictions.output at" in error


def test_an_output_that_is_a_folder_is_one_message_before_loading(trained_run, prompts, tmp_path, capsys, monkeypatch):
    """It failed with IsADirectoryError after every prompt had been answered, leaving hidden part files beside it."""
    monkeypatch.setattr("qlora_lit.module.load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "answers").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(predict_args(trained_run[0], prompts, tmp_path / "answers"))
    assert exit_info.value.code == 2
    assert (
        f"predictions.output {tmp_path / 'answers'} is a folder; give the path of a JSONL file for the answers, e.g. "
        f"--predictions.output {tmp_path / 'answers' / 'predictions.jsonl'}" in capsys.readouterr().err
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["answers"]


@pytest.mark.slow
def test_predict_on_two_processes(trained_run, prompts, generated, tmp_path):
    output = tmp_path / "predictions.jsonl"
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]
    command = [sys.executable, "-m", "qlora_lit", *predict_args(trained_run[0], prompts, output), *ddp]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # 5 prompts: 3 answered on rank 0, 2 on rank 1, merged back in file order.
    assert read_jsonl(output) == [{**row, "generated": answer} for row, answer in zip(PROMPTS, generated, strict=True)]


CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "안녕?"}, {"role": "assistant", "content": "안녕하세요."}]
     + [{"role": "user", "content": "한국의 수도는?"}]},
    {"conversations": [{"from": "system", "value": "짧게 답해."}, {"from": "human", "value": "하늘은 왜 파래?"}]},
    {"instruction": "김치찌개 끓이는 법을 알려줘."},
]  # fmt: skip


def test_predict_answers_conversation_rows_as_generate_does(trained_run, tmp_path):
    """Rows of `messages` and ShareGPT `conversations` (the last turn the user's) beside a single-turn row."""
    prompts = tmp_path / "conversations.jsonl"
    prompts.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in CONVERSATIONS), encoding="utf-8")
    adapter = str(trained_run[0] / "adapter")
    expected = cli_main(
        ["generate", "--adapter", adapter, "--prompts_file", str(prompts), "--batch_size", "2", *GREEDY]
    )
    output = tmp_path / "predictions.jsonl"
    cli_main(predict_args(trained_run[0], str(prompts), output))
    answers = read_jsonl(output)
    assert answers == [{**row, "generated": answer} for row, answer in zip(CONVERSATIONS, expected, strict=True)]

"""Conversations end to end: `fit` on a `messages` JSONL file and a ShareGPT `conversations` JSON file with no setting
but --data.path, then the adapter in `chat` (through its stdin, in-process and in a child process) and in `generate`
with conversation rows. One short fit serves every test here."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEMO_CONFIG
from transformers import TextStreamer

import qlora_lit.chat
import qlora_lit.generate
from qlora_lit.assets import resolve_asset
from qlora_lit.chat import ChatSession, command, reply
from qlora_lit.cli import cli_main
from qlora_lit.data.conversations import Message, with_system
from qlora_lit.data.inference import prompt_messages
from qlora_lit.data.prompts import PromptFormat
from qlora_lit.errors import ConfigError
from qlora_lit.tokenizer import load_tokenizer

GREEDY = ["--generation.do_sample", "false", "--generation.max_new_tokens", "6", "--dtype", "fp32"]
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["qlora_lit"])


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory) -> Path:
    """A 2-step demo fit on the shipped chat sample split in two files: half as `messages` JSON lines, half as a
    ShareGPT JSON list of `conversations`; nothing but --data.path says what they are."""
    root = tmp_path_factory.mktemp("chat_run")
    rows = [json.loads(line) for line in Path(resolve_asset("builtin:ko_chat_sample.jsonl")).read_text().splitlines()]
    messages, sharegpt = root / "messages.jsonl", root / "sharegpt.json"
    messages.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows[:18]), encoding="utf-8")
    converted = [
        {"conversations": [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in row["messages"]]}
        for row in rows[18:]
    ]
    sharegpt.write_text(json.dumps(converted, ensure_ascii=False, indent=1), encoding="utf-8")
    overrides = {
        "data.path": f"[{messages}, {sharegpt}]",
        "data.val_size": "4",
        "trainer.max_steps": "2",
        "trainer.val_check_interval": "2",
        "trainer.enable_progress_bar": "false",
        "samples.prompts": "[]",
        "trainer.logger.init_args.save_dir": str(root / "runs"),
        "data.cache_dir": str(root / "cache"),  # session fixtures run before the per-test cache isolation
    }
    args = [item for key, value in overrides.items() for item in (f"--{key}", value)]
    cli = cli_main(["fit", "--config", DEMO_CONFIG, *args])
    return Path(cli.trainer.log_dir)


def test_fit_trains_on_messages_and_sharegpt_files_with_only_their_paths(chat_run):
    stats = json.loads((chat_run / "data_stats.json").read_text())
    assert [source["rows"] for source in stats["sources"]] == [18, 18]
    assert stats["multi_turn_rows"] == 34 and stats["turns"] == 77 and stats["bad_rows_skipped"] == 0
    assert (chat_run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((chat_run / "adapter" / "trainer_state.json").read_text())["global_step"] == 2


def koalpaca(adapter: Path) -> PromptFormat:
    return PromptFormat.named("koalpaca", load_tokenizer(str(adapter)))


def conversation(*turns: str, system: str | None = None) -> tuple[Message, ...]:
    """Alternating user and assistant turns, the last the user's."""
    roles = ("user", "assistant")
    return with_system([Message(roles[index % 2], text) for index, text in enumerate(turns)], system)


@pytest.fixture
def recorded_prompts(monkeypatch) -> list[list[int]]:
    """The prompt ids the chat command generates from, recorded as they go (the real generation runs)."""
    prompts: list[list[int]] = []
    real = qlora_lit.chat.generate_texts

    def recording(model, tokenizer, batch, args, streamer=None, **kwargs):
        assert isinstance(streamer, TextStreamer)  # answers stream to the terminal
        prompts.append(batch["input_ids"][0].tolist())
        return real(model, tokenizer, batch, args, streamer, **kwargs)

    monkeypatch.setattr(qlora_lit.chat, "generate_texts", recording)
    return prompts


def test_chat_keeps_the_conversation_in_the_training_format(chat_run, recorded_prompts, monkeypatch, capsys):
    adapter = chat_run / "adapter"
    lines = ["안녕하세요!", "김치찌개는 어떻게 끓여요?", "/system 짧게 답하세요.", "서울 여행지를 추천해 줘.", "/reset"]
    lines += ["", "고마워요.", "/exit", "이 줄은 읽히지 않아요."]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    said = cli_main(["chat", "--adapter", str(adapter), *GREEDY, "--quantize", "none"])
    (q1, a1), (q2, _), (q3, _), (q4, _) = said
    expected = [
        conversation(q1),
        conversation(q1, a1, q2),  # the first answer, as generated, in the training template
        conversation(q3, system="짧게 답하세요."),  # /system starts a new conversation with it
        conversation(q4, system="짧게 답하세요."),  # /reset keeps the system prompt
    ]
    assert [q for q, _ in said] == ["안녕하세요!", "김치찌개는 어떻게 끓여요?", "서울 여행지를 추천해 줘.", "고마워요."]
    assert recorded_prompts == koalpaca(adapter).prompt_ids(expected)
    shown = capsys.readouterr().out
    assert all(answer in shown for _, answer in said) and shown.count("모델> ") == 4
    assert "(system prompt: '짧게 답하세요.'; a new conversation)" in shown and "(a new conversation)" in shown


def test_chat_forgets_the_earliest_turns_to_stay_within_the_context(chat_run, recorded_prompts, monkeypatch, capsys):
    adapter = chat_run / "adapter"
    questions = [
        ("부산 여행 계획을 세우고 있어요. " * 3).strip(),
        ("해운대 맛집도 알려 주세요. " * 3).strip(),
        "둘째 날은요?",
    ]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join([*questions, "너무 " * 200]) + "\n"))
    prompt_format = koalpaca(adapter)
    two_questions = len(prompt_format.prompt_ids([conversation(questions[0], "네.", questions[1])])[0])
    context = two_questions + 6  # a first answer longer than "네." (or any third question) cannot stay
    said = cli_main(["chat", "--adapter", str(adapter), *GREEDY, "--quantize", "none", "--max_context", str(context)])
    assert [q for q, _ in said] == questions  # the one that can never fit is not asked
    budget = context - 6
    assert all(len(prompt) <= budget for prompt in recorded_prompts)
    history: list[str] = []
    for (question, answer), prompt in zip(said, recorded_prompts, strict=True):
        while len(prompt_format.prompt_ids([conversation(*history, question)])[0]) > budget:
            history = history[2:]  # the earliest question and its answer
        assert prompt == prompt_format.prompt_ids([conversation(*history, question)])[0]
        history += [question, answer]
    shown = capsys.readouterr().out
    assert "earliest turn(s) no longer fit the context and are forgotten" in shown
    assert f"(the message is longer than the context allows, {budget} tokens; say it shorter: " in shown


def test_a_message_too_long_for_the_context_alone_is_refused_and_the_conversation_kept(tokenizer, capsys):
    """Every earlier turn was forgotten first, one by one, and then the message refused: nothing was left."""
    session = ChatSession(PromptFormat.named("koalpaca", tokenizer), None, budget=200)
    turns = [("안녕", "안녕하세요"), ("김치찌개 재료?", "김치, 돼지고기, 두부")]
    session.turns += turns
    assert reply(session, None, tokenizer, None, "이 글을 요약해줘: " + "아주 긴 글입니다. " * 100) is None
    assert session.turns == turns
    shown = capsys.readouterr().out
    assert "forgotten" not in shown and "say it shorter: the conversation so far is kept" in shown


def test_chat_reads_a_piped_stdin_in_a_terminal_session(chat_run, tmp_path):
    """`python -m qlora_lit chat` as a user runs it, its input piped: it answers each line and ends at the input's
    end."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "qlora_lit", "chat", "--adapter", str(chat_run / "adapter"), *GREEDY]
    command += ["--quantize", "none"]
    result = subprocess.run(
        command,
        input="안녕하세요!\n/system 존댓말로 답하세요.\n고마워요.\n",
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("사용자> ") == 4 and result.stdout.count("모델> ") == 2
    assert "(system prompt: '존댓말로 답하세요.'; a new conversation)" in result.stdout


def test_generate_answers_the_last_user_turn_of_conversation_rows(chat_run, tmp_path, monkeypatch):
    adapter = chat_run / "adapter"
    rows = [
        {
            "messages": [
                {"role": "user", "content": "안녕?"},
                {"role": "assistant", "content": "안녕하세요!"},
                {"role": "user", "content": "이름이 뭐예요?"},
            ],
            "id": 1,
        },
        {"conversations": [{"from": "system", "value": "짧게."}, {"from": "human", "value": "한글날은?"}]},
        {"instruction": "김치찌개 끓이는 법을 알려줘."},
    ]
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    asked: list[list[int]] = []
    real = qlora_lit.generate.generate_texts

    def recording(model, tokenizer, batch, args, streamer=None, **kwargs):
        pairs = zip(batch["input_ids"], batch["attention_mask"], strict=True)
        asked.extend(ids[mask.bool()].tolist() for ids, mask in pairs)
        return real(model, tokenizer, batch, args, streamer, **kwargs)

    monkeypatch.setattr(qlora_lit.generate, "generate_texts", recording)
    output = tmp_path / "answers.jsonl"
    args = ["--prompts_file", str(prompts_file), "--output", str(output), "--system", "친절하게.", "--quantize", "none"]
    answers = cli_main(["generate", "--adapter", str(adapter), *args, *GREEDY])
    written = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert written == [{**row, "generated": answer} for row, answer in zip(rows, answers, strict=True)]
    expected = [prompt_messages(row, "친절하게.") for row in rows]
    assert expected[1][0] == Message("system", "짧게.")  # a row's own system prompt stays
    assert asked == koalpaca(adapter).prompt_ids(expected)


def test_a_system_prompt_the_template_cannot_take_is_refused_and_the_session_goes_on(tokenizer):
    """`/system ...` with a template without a system role (Mistral's, Gemma's): the next message ended the session."""
    inst = tokenizer.__class__.from_pretrained(resolve_asset("builtin:tiny-llama"))
    inst.chat_template = (
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]{% else %}{{ m.content + eos_token }}"
        "{% endif %}{% endfor %}"
    )
    session = ChatSession(PromptFormat.named("chat", inst), None, budget=1000)
    session.turns.append(("안녕", "안녕하세요"))
    said = command(session, "/system 짧게 답하세요.")
    assert "System role not supported" in said and "the system prompt stays None" in said
    assert session.system is None and session.turns == [("안녕", "안녕하세요")]
    ids, forgotten = session.prompt_ids("김치찌개 끓이는 법?")
    assert ids is not None and forgotten == 0
    with pytest.raises(ConfigError, match="System role not supported"):
        session.check_system("짧게 답하세요.")  # what `chat --system ...` checks before the first message

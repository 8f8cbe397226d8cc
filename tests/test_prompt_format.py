"""One object per prompt format: the same prompt text and ids in training and generation, the ids and token-cache
keys that the formats gave before they were objects, and the format's name as a run's config saves it."""

from __future__ import annotations

import copy
from typing import get_args

import pytest
from conftest import SAMPLE_DATA

from qlora_lit.data.inference import encode_prompts
from qlora_lit.data.prompts import (
    FORMATS,
    PROMPT_NO_INPUT,
    PROMPT_WITH_INPUT,
    Message,
    PromptFormat,
    PromptFormatName,
    build_prompt,
    row_messages,
    tokenize_rows,
    trained_format_name,
)
from qlora_lit.data.sources import clean_table, load_sources

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = CHAT_TEMPLATE
    return chat


@pytest.fixture(scope="module")
def table():
    rows, _ = clean_table(load_sources([SAMPLE_DATA], None, "utf-8"))
    return rows


def reference_ids(tokenizer, name: str, instruction: str, input: str, output: str) -> tuple[list[int], list[int]]:
    """The ids as each format was specified before it was an object: koalpaca, the template with the tokenizer's BOS
    and the answer with its EOS; chat, the chat template's prompt and the rest of the conversation, no added tokens."""
    if name == "koalpaca":
        prompt = tokenizer(build_prompt(instruction, input))["input_ids"]
        return prompt, tokenizer(output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    user = [{"role": "user", "content": f"{instruction}\n\n{input}" if input and input.strip() else instruction}]
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": output}], tokenize=False)
    as_ids = tokenizer([prompt, full[len(prompt) :]], add_special_tokens=False)["input_ids"]
    return as_ids[0], as_ids[1]


@pytest.mark.parametrize("name", ["koalpaca", "chat"])
def test_training_ids_are_those_of_the_format_specification(name, tokenizer, chat_tokenizer, table):
    chosen = tokenizer if name == "koalpaca" else chat_tokenizer
    prompt_ids, response_ids = tokenize_rows(PromptFormat.named(name, chosen), table)
    rows = table[["instruction", "input", "output"]].itertuples(index=False, name=None)
    expected = [reference_ids(chosen, name, *row) for row in rows]
    assert prompt_ids == [prompt for prompt, _ in expected]
    assert response_ids == [response for _, response in expected]
    assert any(input.strip() for input in table["input"]) and not all(input.strip() for input in table["input"])


def test_token_cache_keys_stay_those_of_the_cached_data(tokenizer, chat_tokenizer):
    """Token caches are keyed by the fingerprint: a change invalidates every user's cache, so it changes on purpose."""
    assert PromptFormat.named("koalpaca", tokenizer).fingerprint() == "koalpaca:67a739c97d33a502"
    assert PROMPT_WITH_INPUT + PROMPT_NO_INPUT in PromptFormat.named("koalpaca", tokenizer).template()
    assert PromptFormat.named("chat", chat_tokenizer).fingerprint() == "chat:674c69f0ed5fbe18"  # CHAT_TEMPLATE's
    other = copy.deepcopy(chat_tokenizer)
    other.chat_template = CHAT_TEMPLATE.replace("<|assistant|>", "<|bot|>")
    assert PromptFormat.named("chat", other).fingerprint() != PromptFormat.named("chat", chat_tokenizer).fingerprint()


@pytest.mark.parametrize("name", ["koalpaca", "chat"])
@pytest.mark.parametrize("input", [None, "서울은 한국의 수도이다."])
def test_generation_prompts_are_the_training_prompts(name, input, tokenizer, chat_tokenizer):
    prompt_format = PromptFormat.named(name, tokenizer if name == "koalpaca" else chat_tokenizer)
    training = prompt_format.segments(row_messages("요약해줘.", input, "네."))
    asked = prompt_format.segments(row_messages("요약해줘.", input))
    assert [segment.trained for segment in training] == [False, True]
    assert asked == training[:1] and prompt_format.prompt(row_messages("요약해줘.", input)) == training[0].text
    [[trained_prompt, _]] = prompt_format.encode([row_messages("요약해줘.", input, "네.")])
    assert prompt_format.prompt_ids([row_messages("요약해줘.", input)]) == [trained_prompt.ids]
    rows = [{"instruction": "요약해줘.", "input": input}]
    assert encode_prompts(prompt_format.tokenizer, rows, name) == [trained_prompt.ids]


def test_a_chat_turn_carries_the_input_after_a_blank_line(chat_tokenizer):
    assert Message("user", "요약해줘.", "긴 글").text() == "요약해줘.\n\n긴 글"
    assert Message("user", "요약해줘.", "  ").text() == "요약해줘."
    prompt = PromptFormat.named("chat", chat_tokenizer).prompt(row_messages("요약해줘.", "긴 글"))
    assert prompt == "<|user|>요약해줘.\n\n긴 글<|end_of_text|><|assistant|>"


def test_conversations_other_than_one_turn_are_not_rendered_yet(tokenizer):
    system = [Message("system", "친절하게."), *row_messages("안녕?", None, "안녕하세요!")]
    with pytest.raises(NotImplementedError, match=r"one user turn.*\['system', 'user', 'assistant'\]"):
        PromptFormat.named("koalpaca", tokenizer).segments(system)


def test_each_format_names_itself_as_the_config_does():
    assert list(FORMATS) == list(get_args(PromptFormatName))
    assert all(FORMATS[name].name == name for name in FORMATS)
    assert trained_format_name({"data": {"prompt_format": "chat"}}) == "chat"
    assert trained_format_name({}) == trained_format_name({"data": {"prompt_format": None}}) == "koalpaca"

"""One object per prompt format: conversations rendered as training and generation alike, the loss on every assistant
turn and its end of turn and nowhere else (checked against the rendered text, turn by turn, for the koalpaca template
and two real chat templates), the ids and token-cache keys of single-turn rows, and the format's name as a run's
config saves it."""

from __future__ import annotations

import copy
from typing import get_args

import pytest
from conftest import SAMPLE_DATA

from qlora_lit.data.conversations import Message, row_messages
from qlora_lit.data.inference import encode_prompts
from qlora_lit.data.prompts import (
    FORMATS,
    PromptFormat,
    PromptFormatName,
    build_prompt,
    trained_format_name,
)
from qlora_lit.data.sources import load_conversations
from qlora_lit.errors import ConfigError

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Meta-Llama-3-8B-Instruct's chat template (tokenizer_config.json): BOS, headers, content trimmed, <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen2.5-Instruct's ChatML template without its tool-calling branches: a default system prompt when there is none,
# a newline after each <|im_end|>.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
# ChatML as some fine-tuned models ship it: no add_generation_prompt branch, the header written only with an answer.
NO_GENERATION_PROMPT_TEMPLATE = QWEN_TEMPLATE.removesuffix(
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
# Vicuna-like: turns end in plain text, with no special token.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m.role.upper() }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# name -> (template, the special tokens it needs, the end of an assistant turn that the loss covers)
TEMPLATES = {
    "llama3": (LLAMA3_TEMPLATE, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>"),
    "qwen": (QWEN_TEMPLATE, ["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "plain": (PLAIN_TEMPLATE, [], "<|end_of_text|>"),  # the tokenizer's EOS, which the template never writes
    "no-generation-prompt": (NO_GENERATION_PROMPT_TEMPLATE, ["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
}
CONVERSATION = (
    Message("system", "당신은 친절한 한국어 도우미입니다."),
    Message("user", "김치볶음밥 재료가 뭐예요?"),
    Message("assistant", "김치, 밥, 대파가 있으면 돼요."),
    Message("user", "김치가 너무 시어요."),
    Message("assistant", "설탕을 조금 넣어 볶으세요."),
    Message("user", "위에는 뭘 올려요?"),
    Message("assistant", "달걀프라이와 김가루요."),
)
ANSWERS = [message.content for message in CONVERSATION if message.role == "assistant"]


def with_template(tokenizer, template: str, special_tokens: list[str] = ()):
    """The tiny tokenizer with a chat template and the special tokens it writes, as an instruct model's has them."""
    chat = copy.deepcopy(tokenizer)
    if special_tokens:
        chat.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    chat.chat_template = template
    return chat


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    return with_template(tokenizer, CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def conversations():
    rows, _, _ = load_conversations([SAMPLE_DATA])
    return rows


def format_for(name: str, tokenizer):
    """`koalpaca` on the tiny tokenizer, `chat` with the simple template, or a real template by name."""
    if name in TEMPLATES:
        template, special_tokens, _ = TEMPLATES[name]
        return PromptFormat.named("chat", with_template(tokenizer, template, special_tokens))
    return PromptFormat.named(name, tokenizer if name == "koalpaca" else with_template(tokenizer, CHAT_TEMPLATE))


def reference_ids(tokenizer, name: str, instruction: str, input: str, output: str) -> tuple[list[int], list[int]]:
    """The ids as each format was specified for single-turn rows: koalpaca, the template with the tokenizer's BOS and
    the answer with its EOS; chat, the chat template's prompt and the rest of the conversation, no added tokens."""
    if name == "koalpaca":
        prompt = tokenizer(build_prompt(instruction, input))["input_ids"]
        return prompt, tokenizer(output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    user = [{"role": "user", "content": f"{instruction}\n\n{input}" if input and input.strip() else instruction}]
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": output}], tokenize=False)
    as_ids = tokenizer([prompt, full[len(prompt) :]], add_special_tokens=False)["input_ids"]
    return as_ids[0], as_ids[1]


@pytest.mark.parametrize("name", ["koalpaca", "chat"])
def test_single_turn_rows_have_the_ids_of_the_format_specification(name, tokenizer, chat_tokenizer, conversations):
    """KoAlpaca rows tokenize as they did before conversations: the prompt untrained, the answer (and EOS) trained."""
    chosen = tokenizer if name == "koalpaca" else chat_tokenizer
    encoded = PromptFormat.named(name, chosen).encode(conversations)
    for conversation, tokens in zip(conversations, encoded, strict=True):
        user, answer = conversation
        prompt, response = reference_ids(chosen, name, user.content, user.input, answer.content)
        assert tokens.ids == prompt + response
        assert tokens.trained == [(len(prompt), len(prompt) + len(response))]
    inputs = [conversation[0].input or "" for conversation in conversations]
    assert any(input.strip() for input in inputs) and not all(input.strip() for input in inputs)


def test_token_cache_keys_change_only_on_purpose(tokenizer, chat_tokenizer):
    """Token caches are keyed by the fingerprint: a change invalidates every user's cache, so it changes on purpose.
    koalpaca's changed once, when the template gained system prompts and later turns (the sections it adds are part
    of what decides the text); the cache's version changed with it, so no cache was reused across the change."""
    koalpaca = PromptFormat.named("koalpaca", tokenizer)
    assert koalpaca.fingerprint() == "koalpaca:3b31c798bc07f773"
    assert PromptFormat.named("chat", chat_tokenizer).fingerprint() == "chat:674c69f0ed5fbe18"  # CHAT_TEMPLATE's
    other = with_template(tokenizer, CHAT_TEMPLATE.replace("<|assistant|>", "<|bot|>"))
    assert PromptFormat.named("chat", other).fingerprint() != PromptFormat.named("chat", chat_tokenizer).fingerprint()


KOALPACA_RENDERED = (
    "<|begin_of_text|>아래는 작업을 설명하는 지시사항입니다. 이에 대한 적절한 응답을 작성해주세요.\n\n"
    "### 시스템:\n당신은 친절한 한국어 도우미입니다.\n\n"
    "### 지시사항:\n김치볶음밥 재료가 뭐예요?\n\n### 응답:김치, 밥, 대파가 있으면 돼요.<|end_of_text|>\n\n"
    "### 지시사항:\n김치가 너무 시어요.\n\n### 응답:설탕을 조금 넣어 볶으세요.<|end_of_text|>\n\n"
    "### 지시사항:\n위에는 뭘 올려요?\n\n### 응답:달걀프라이와 김가루요.<|end_of_text|>"
)


@pytest.mark.parametrize("name", ["koalpaca", "llama3", "qwen", "no-generation-prompt"])
def test_the_loss_covers_every_answer_and_its_end_of_turn_and_nothing_else(name, tokenizer):
    """Turn by turn against the rendered text: each trained span is one answer and the end of its turn (the EOS for
    koalpaca, the template's end-of-turn token), in order; what is left untrained is the rendered conversation with
    exactly those pieces taken out: the system prompt, every user turn and every role header."""
    prompt_format = format_for(name, tokenizer)
    chosen = prompt_format.tokenizer
    if name == "koalpaca":
        rendered, end = KOALPACA_RENDERED, chosen.eos_token
    else:
        turns = [{"role": message.role, "content": message.content} for message in CONVERSATION]
        rendered, end = chosen.apply_chat_template(turns, tokenize=False), TEMPLATES[name][2]
    [tokens] = prompt_format.encode([CONVERSATION])
    assert chosen.decode(tokens.ids) == rendered
    trained = [chosen.decode(tokens.ids[start:end_]) for start, end_ in tokens.trained]
    assert trained == [answer + end for answer in ANSWERS]
    untrained, position = [], 0
    for start, end_ in tokens.trained:
        untrained.append(chosen.decode(tokens.ids[position:start]))
        position = end_
    untrained.append(chosen.decode(tokens.ids[position:]))
    remaining = rendered
    for piece in trained:
        before, found, remaining = remaining.partition(piece)
        assert found and before == untrained.pop(0)
    assert remaining == untrained.pop(0) and remaining.strip() == ""  # at most the template's newline after the end
    assert all(message.content in rendered for message in CONVERSATION)


@pytest.mark.parametrize("name", ["koalpaca", "chat", "llama3", "qwen", "plain", "no-generation-prompt"])
def test_prompts_to_answer_are_the_training_text_up_to_the_answer(name, tokenizer):
    """At every turn, the prompt that generation continues is the training conversation's ids up to that answer."""
    prompt_format = format_for(name, tokenizer)
    [training] = prompt_format.encode([CONVERSATION])
    asked = [CONVERSATION[:index] for index, message in enumerate(CONVERSATION) if message.role == "assistant"]
    prompts = prompt_format.prompt_ids(asked)
    assert [len(prompt) for prompt in prompts] == [start for start, _ in training.trained]
    assert prompts == [training.ids[:start] for start, _ in training.trained]
    bos = prompt_format.tokenizer.bos_token if name == "koalpaca" else ""  # added by the tokenizer, not the text
    assert bos + prompt_format.prompt(asked[-1]) == prompt_format.tokenizer.decode(prompts[-1])
    for turn, tokens in enumerate(prompt_format.encode(asked)):  # a prompt's only trained spans: the earlier answers
        assert tokens.trained == training.trained[:turn]


@pytest.mark.parametrize("name", ["koalpaca", "chat"])
@pytest.mark.parametrize("input", [None, "서울은 한국의 수도이다."])
def test_generation_prompts_of_rows_are_the_training_prompts(name, input, tokenizer, chat_tokenizer):
    prompt_format = PromptFormat.named(name, tokenizer if name == "koalpaca" else chat_tokenizer)
    training = prompt_format.segments(row_messages("요약해줘.", input, "네."))
    asked = prompt_format.segments(row_messages("요약해줘.", input))
    assert [segment.trained for segment in training] == [False, True]
    assert asked == training[:1] and prompt_format.prompt(row_messages("요약해줘.", input)) == training[0].text
    [tokens] = prompt_format.encode([row_messages("요약해줘.", input, "네.")])
    prompt_ids = tokens.ids[: tokens.trained[0][0]]
    assert prompt_format.prompt_ids([row_messages("요약해줘.", input)]) == [prompt_ids]
    rows = [{"instruction": "요약해줘.", "input": input}]
    assert encode_prompts(prompt_format.tokenizer, rows, name) == [prompt_ids]


def test_a_system_prompt_opens_the_conversation_in_both_formats(tokenizer, chat_tokenizer):
    row = row_messages("안녕?", None, None, system="짧게 답하세요.")
    assert PromptFormat.named("koalpaca", tokenizer).prompt(row) == (
        "아래는 작업을 설명하는 지시사항입니다. 이에 대한 적절한 응답을 작성해주세요.\n\n"
        "### 시스템:\n짧게 답하세요.\n\n### 지시사항:\n안녕?\n\n### 응답:"
    )
    assert PromptFormat.named("chat", chat_tokenizer).prompt(row) == (
        "<|system|>짧게 답하세요.<|end_of_text|><|user|>안녕?<|end_of_text|><|assistant|>"
    )
    assert encode_prompts(tokenizer, [{"instruction": "안녕?"}], system_prompt="짧게 답하세요.") == (
        PromptFormat.named("koalpaca", tokenizer).prompt_ids([row])
    )


def test_a_chat_turn_carries_the_input_after_a_blank_line(chat_tokenizer):
    assert Message("user", "요약해줘.", "긴 글").text() == "요약해줘.\n\n긴 글"
    assert Message("user", "요약해줘.", "  ").text() == "요약해줘."
    prompt = PromptFormat.named("chat", chat_tokenizer).prompt(row_messages("요약해줘.", "긴 글"))
    assert prompt == "<|user|>요약해줘.\n\n긴 글<|end_of_text|><|assistant|>"


def test_templates_that_cannot_mark_the_turns_are_one_message(tokenizer):
    """A template that renders the last turn apart from the earlier ones (as reasoning models' drop earlier thinking)
    cannot have its turns found by rendering prefixes; a template that refuses a role says so."""
    marks_the_last = with_template(
        tokenizer,
        "{% for m in messages %}<|{{ m.role }}|>{% if loop.last %}[last]{% endif %}{{ m.content }}{{ eos_token }}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
    )
    with pytest.raises(ConfigError, match="renders the beginning of a conversation differently once later turns"):
        PromptFormat.named("chat", marks_the_last).encode([CONVERSATION[1:]])
    no_system = with_template(
        tokenizer,
        "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + CHAT_TEMPLATE,
    )
    with pytest.raises(ConfigError, match=r"cannot render a conversation of the roles \['system'.*System role not"):
        PromptFormat.named("chat", no_system).encode([CONVERSATION])


@pytest.mark.parametrize(
    ("name", "end"),
    [
        ("koalpaca", "<|end_of_text|>"),
        ("chat", "<|end_of_text|>"),
        ("llama3", "<|eot_id|>"),
        ("qwen", "<|im_end|>"),
        ("plain", "<|end_of_text|>"),
    ],
)
def test_generation_stops_at_the_token_that_ends_trained_answers(name, end, tokenizer):
    prompt_format = format_for(name, tokenizer)
    assert prompt_format.tokenizer.convert_ids_to_tokens(prompt_format.stop_token_ids) == [end]


def test_a_template_whose_turns_end_in_plain_text_trains_the_eos_after_each_answer(tokenizer):
    """With no special token to end a turn, no answer's labels held an end: the model never learned to stop."""
    prompt_format = format_for("plain", tokenizer)
    [tokens] = prompt_format.encode([CONVERSATION])
    trained = [tokenizer.decode(tokens.ids[start:end]) for start, end in tokens.trained]
    assert trained == [f" {answer}{tokenizer.eos_token}" for answer in ANSWERS]
    turns = [{"role": message.role, "content": message.content} for message in CONVERSATION]
    rendered = prompt_format.tokenizer.apply_chat_template(turns, tokenize=False)
    for answer in ANSWERS:  # the EOS goes before the template's newline, which the next turn's prompt keeps
        rendered = rendered.replace(f"{answer}\n", f"{answer}{tokenizer.eos_token}\n")
    assert tokenizer.decode(tokens.ids) == rendered
    assert prompt_format.stop_token_ids == [tokenizer.eos_token_id]


def test_each_format_names_itself_as_the_config_does():
    assert list(FORMATS) == list(get_args(PromptFormatName))
    assert all(FORMATS[name].name == name for name in FORMATS)
    assert trained_format_name({"data": {"prompt_format": "chat"}}) == "chat"
    assert trained_format_name({}) == trained_format_name({"data": {"prompt_format": None}}) == "koalpaca"

"""Prompt formats (the Korean Alpaca templates, or the tokenizer's chat template) and how rows become token ids."""

from __future__ import annotations

import hashlib
from typing import Literal

import pandas as pd
from transformers import PreTrainedTokenizerBase

from qlora_lit.errors import ConfigError

PromptFormat = Literal["koalpaca", "chat"]
PROMPT_FORMATS = ("koalpaca", "chat")

PROMPT_WITH_INPUT = """아래는 작업을 설명하는 지시사항과 추가 정보를 제공하는 입력이 짝으로 구성됩니다. 이에 대한 적절한 응답을 작성해주세요.

### 지시사항:
{instruction}

### 입력:
{input}

### 응답:"""

PROMPT_NO_INPUT = """아래는 작업을 설명하는 지시사항입니다. 이에 대한 적절한 응답을 작성해주세요.

### 지시사항:
{instruction}

### 응답:"""


def build_prompt(instruction: str, input: str | None = None) -> str:
    """The prompt the model completes; a missing or blank `input` selects the no-input template."""
    if input and input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def chat_texts(tokenizer: PreTrainedTokenizerBase, instruction: str, input: str, output: str) -> tuple[str, str]:
    """The chat template's prompt (the user turn and the assistant header) and the rest of the conversation.

    The rest is the answer with the template's own end of turn (e.g. `<|eot_id|>`): the loss covers it, so the model
    learns to stop where the template says a turn ends.
    """
    user = [{"role": "user", "content": f"{instruction}\n\n{input}" if input and input.strip() else instruction}]
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": output}], tokenize=False)
    if not full.startswith(prompt):
        raise ConfigError(
            "the tokenizer's chat template does not render a conversation as prompt + answer; "
            "use data.prompt_format: koalpaca"
        )
    return prompt, full[len(prompt) :]


def check_prompt_format(prompt_format: str) -> None:
    if prompt_format not in PROMPT_FORMATS:
        raise ConfigError(f"data.prompt_format must be one of {list(PROMPT_FORMATS)}, got {prompt_format!r}")


def check_chat_template(tokenizer: PreTrainedTokenizerBase, prompt_format: str, name: str) -> None:
    if prompt_format == "chat" and not tokenizer.chat_template:
        raise ConfigError(
            f"data.prompt_format=chat needs a tokenizer with a chat template, and {name!r} has none (base models "
            "usually have none; instruct models do). Use data.prompt_format: koalpaca, or an instruct model's tokenizer"
        )


def template_fingerprint(tokenizer: PreTrainedTokenizerBase, prompt_format: str) -> str:
    """What decides the text around each row: the format and its template (ours, or the tokenizer's chat template)."""
    template = tokenizer.chat_template if prompt_format == "chat" else PROMPT_WITH_INPUT + PROMPT_NO_INPUT
    return f"{prompt_format}:{hashlib.sha256(str(template).encode()).hexdigest()[:16]}"


def tokenize_rows(
    tokenizer: PreTrainedTokenizerBase, table: pd.DataFrame, prompt_format: str = "koalpaca"
) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt and response token ids of every instruction/input/output row, untruncated, in one batched call each.

    koalpaca: our template, the tokenizer's BOS (if it adds one) before the prompt and its EOS after the response.
    chat: the tokenizer's chat template, which places every special token itself.
    """
    rows = list(table[["instruction", "input", "output"]].itertuples(index=False, name=None))
    if prompt_format == "chat":
        prompts, responses = zip(*(chat_texts(tokenizer, *row) for row in rows), strict=True)
        prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        return prompt_ids, tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer([build_prompt(instruction, input) for instruction, input, _ in rows])["input_ids"]
    response_ids = tokenizer([output for _, _, output in rows], add_special_tokens=False)["input_ids"]
    return prompt_ids, [ids + [tokenizer.eos_token_id] for ids in response_ids]


def encode_example(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int
) -> dict[str, list[int] | int]:
    """Token ids of prompt + response + the tokenizer's own EOS, cut at `max_length`.

    Prompt and response are tokenized separately so the prompt's length is known exactly (the collator masks the
    prompt by position). A response cut by `max_length` loses its EOS: the model must not learn to stop there.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return cut_example(prompt_ids, response_ids, max_length)


def cut_example(prompt_ids: list[int], response_ids: list[int], max_length: int) -> dict[str, list[int] | int]:
    """One training example: prompt + response ids cut at `max_length`, and the prompt's length (for label masks)."""
    return {"input_ids": (prompt_ids + response_ids)[:max_length], "prompt_length": min(len(prompt_ids), max_length)}


def fit_to_length(
    prompt_ids: list[list[int]], response_ids: list[list[int]], max_length: int, overlong: str = "truncate"
) -> tuple[list[dict], dict[str, int]]:
    """Examples of at most `max_length` tokens, and counts of what happened to the longer rows.

    `overlong="truncate"` cuts them (the response loses its EOS), `"drop"` leaves them out. A row whose prompt alone
    fills `max_length` is dropped either way: nothing of its response would be trained.
    """
    examples = []
    counts = {"overlong": 0, "truncated": 0, "overlong_dropped": 0, "prompt_too_long_dropped": 0}
    for prompt, response in zip(prompt_ids, response_ids, strict=True):
        if len(prompt) + len(response) > max_length:
            counts["overlong"] += 1
            reason = "overlong_dropped" if overlong == "drop" else "truncated"
            reason = "prompt_too_long_dropped" if len(prompt) >= max_length else reason
            counts[reason] += 1
            if reason != "truncated":
                continue
        examples.append(cut_example(prompt, response, max_length))
    return examples, counts

"""Prompt formats: how a conversation becomes the text and token ids a model trains on and is prompted with.

One object per format (`PromptFormat`) owns it everywhere: the training examples (`tokenize_rows`), the prompts to
answer (`generate`, `predict` and the TensorBoard samples, through data/inference.py) and the name a run saves in its
config (`data.prompt_format`, which `generate` reads back from the adapter folder). A conversation is a list of
`Message`s; a KoAlpaca row (instruction, optional input, output) is one user turn and its answer. A format renders a
conversation as `Segment`s of text, each trained (the loss covers it: an answer and its end of turn) or not (the
prompt), and `encode` turns many conversations into token-id segments in batched tokenizer calls.

Then each example is cut to `max_length` (`fit_to_length`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import pandas as pd
from transformers import PreTrainedTokenizerBase

from qlora_lit.errors import ConfigError

PromptFormatName = Literal["koalpaca", "chat"]
DEFAULT_FORMAT: PromptFormatName = "koalpaca"

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


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: Literal["system", "user", "assistant"]
    content: str
    input: str | None = None
    """A user turn's extra input (a KoAlpaca row's `input`): the koalpaca template has a section of its own for it,
    other templates get it after the content, past a blank line (`text`)."""

    def text(self) -> str:
        """The content, and the input (when there is one) after a blank line: the turn as one text."""
        return f"{self.content}\n\n{self.input}" if self.input and self.input.strip() else self.content


def row_messages(instruction: str, input: str | None = None, output: str | None = None) -> list[Message]:
    """A KoAlpaca row as a conversation: one user turn and, to train on, its answer."""
    user = Message("user", instruction, input)
    return [user] if output is None else [user, Message("assistant", output)]


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered conversation."""

    text: str
    trained: bool
    """Whether the loss covers it (an answer and its end of turn) or not (the prompt: turns other than answers, and
    the template's headers)."""
    special_tokens: bool = False
    """Tokenized with the tokenizer's own special tokens added (its BOS, before a koalpaca prompt)."""
    eos: bool = False
    """Followed by the tokenizer's EOS (after a koalpaca answer; a chat template writes its own end of turn)."""


class TokenSegment(NamedTuple):
    ids: list[int]
    trained: bool


class PromptFormat:
    """How conversations are rendered for one model; the subclasses are the formats `data.prompt_format` names.

    `segments` renders a conversation that ends with an answer (a training example) or with a user turn (a prompt to
    answer: its text then ends where the answer begins).

    Args:
        tokenizer: the model's tokenizer (its BOS and EOS, or its chat template).
    """

    name: ClassVar[PromptFormatName]
    """The format's value of `data.prompt_format`, saved in the run's config."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    @staticmethod
    def named(
        name: str, tokenizer: PreTrainedTokenizerBase, setting: str | None = None, tokenizer_name: str | None = None
    ) -> PromptFormat:
        """The format called `name` for `tokenizer`. A chat format needs a tokenizer with a chat template; the
        message names `setting` (where `name` came from, e.g. data.prompt_format=chat) and the tokenizer."""
        check_format_name(name)
        if name == ChatTemplateFormat.name and not tokenizer.chat_template:
            where = setting or f'prompt_format "{name}"'
            raise ConfigError(
                f"{where} needs a tokenizer with a chat template, and {tokenizer_name or tokenizer.name_or_path!r} "
                "has none (base models usually have none; instruct models do). Use the koalpaca format, or an "
                "instruct model's tokenizer"
            )
        return FORMATS[name](tokenizer)

    def template(self) -> str:
        """Everything that decides the text around the messages."""
        raise NotImplementedError

    def segments(self, messages: Sequence[Message]) -> list[Segment]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """What the token cache's key takes from the format: its name and a hash of its template."""
        return f"{self.name}:{hashlib.sha256(self.template().encode()).hexdigest()[:16]}"

    def prompt(self, messages: Sequence[Message]) -> str:
        """The text the model completes to answer the last (user) turn of `messages`."""
        return "".join(segment.text for segment in self.segments(messages))

    def encode(self, conversations: Sequence[Sequence[Message]]) -> list[list[TokenSegment]]:
        """Token ids of the segments of every conversation."""
        rendered = [self.segments(messages) for messages in conversations]
        ids = iter(tokenize_segments(self.tokenizer, [segment for segments in rendered for segment in segments]))
        return [[TokenSegment(next(ids), segment.trained) for segment in segments] for segments in rendered]

    def prompt_ids(self, conversations: Sequence[Sequence[Message]]) -> list[list[int]]:
        """Token ids of the prompts that answer the last (user) turn of each conversation, as training tokenized them."""
        return [[token for segment in segments for token in segment.ids] for segments in self.encode(conversations)]


class KoAlpacaFormat(PromptFormat):
    """The walkthrough's Korean templates (### 지시사항 / ### 입력 / ### 응답), with the tokenizer's BOS before the
    prompt and its EOS after the answer."""

    name = "koalpaca"

    def template(self) -> str:
        return PROMPT_WITH_INPUT + PROMPT_NO_INPUT

    def segments(self, messages: Sequence[Message]) -> list[Segment]:
        user, answer = single_turn(messages)
        return self.pieces(build_prompt(user.content, user.input), answer.content if answer else None)

    @staticmethod
    def pieces(prompt: str, answer: str | None = None) -> list[Segment]:
        """A rendered prompt after the tokenizer's BOS and, when given, the answer before its EOS."""
        segments = [Segment(prompt, trained=False, special_tokens=True)]
        return segments if answer is None else [*segments, Segment(answer, trained=True, eos=True)]


class ChatTemplateFormat(PromptFormat):
    """The tokenizer's chat template (instruct models), which places every special token itself. The trained
    segment is the answer with the template's own end of turn (e.g. `<|eot_id|>`): the model learns to stop where
    the template says a turn ends."""

    name = "chat"

    def template(self) -> str:
        return str(self.tokenizer.chat_template)

    def segments(self, messages: Sequence[Message]) -> list[Segment]:
        user, answer = single_turn(messages)
        prompt = self.render([user], add_generation_prompt=True)
        if answer is None:
            return [Segment(prompt, trained=False)]
        full = self.render([user, answer])
        if not full.startswith(prompt):
            raise ConfigError(
                "the tokenizer's chat template does not render a conversation as prompt + answer; "
                "use data.prompt_format: koalpaca"
            )
        return [Segment(prompt, trained=False), Segment(full[len(prompt) :], trained=True)]

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        turns = [{"role": message.role, "content": message.text()} for message in messages]
        return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=add_generation_prompt)


FORMATS: dict[str, type[PromptFormat]] = {cls.name: cls for cls in (KoAlpacaFormat, ChatTemplateFormat)}


def check_format_name(name: str) -> None:
    if name not in FORMATS:
        raise ConfigError(f"data.prompt_format must be one of {list(FORMATS)}, got {name!r}")


def trained_format_name(run_config: dict[str, Any]) -> str:
    """The format a run trained with, as its saved config names it (koalpaca for runs older than the setting)."""
    return (run_config.get("data") or {}).get("prompt_format") or DEFAULT_FORMAT


def single_turn(messages: Sequence[Message]) -> tuple[Message, Message | None]:
    """The user turn and its answer (None: to be answered) of a conversation of one turn, the one shape rows have."""
    roles = [message.role for message in messages]
    if roles not in (["user"], ["user", "assistant"]):
        raise NotImplementedError(f"conversations of one user turn (and its answer) only, got the roles {roles}")
    return messages[0], messages[1] if len(messages) == 2 else None


def tokenize_segments(tokenizer: PreTrainedTokenizerBase, segments: Sequence[Segment]) -> list[list[int]]:
    """Token ids of each segment, in one batched tokenizer call for those with special tokens and one for the rest."""
    ids: list[list[int]] = [[] for _ in segments]
    for special_tokens in (True, False):
        chosen = [index for index, segment in enumerate(segments) if segment.special_tokens == special_tokens]
        if not chosen:
            continue
        texts = [segments[index].text for index in chosen]
        encoded = tokenizer(texts, add_special_tokens=special_tokens)["input_ids"]
        for index, piece in zip(chosen, encoded, strict=True):
            ids[index] = piece + [tokenizer.eos_token_id] if segments[index].eos else piece
    return ids


def tokenize_rows(prompt_format: PromptFormat, table: pd.DataFrame) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt and response token ids of every instruction/input/output row, untruncated (the token cache's
    columns)."""
    rows = table[["instruction", "input", "output"]].itertuples(index=False, name=None)
    encoded = prompt_format.encode([row_messages(*row) for row in rows])
    for segments in encoded:
        if [segment.trained for segment in segments] != [False, True]:
            raise NotImplementedError("the token cache keeps one prompt and one answer per row")
    return [segments[0].ids for segments in encoded], [segments[1].ids for segments in encoded]


def encode_example(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int
) -> dict[str, list[int] | int]:
    """Token ids of a koalpaca prompt (already rendered) + response + the tokenizer's own EOS, cut at `max_length`.

    Prompt and response are tokenized separately so the prompt's length is known exactly (the collator masks the
    prompt by position). A response cut by `max_length` loses its EOS: the model must not learn to stop there.
    """
    prompt_ids, response_ids = tokenize_segments(tokenizer, KoAlpacaFormat.pieces(prompt, response))
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

"""Prompt formats: how a conversation becomes the text and token ids a model trains on and is prompted with.

One object per format (`PromptFormat`) owns it everywhere: the training examples (`encode`), the prompts to answer
(`generate`, `chat`, `predict` and the TensorBoard samples, through data/inference.py) and the name a run saves in its
config (`data.prompt_format`, which the commands read back from the adapter folder). A conversation is a list of
`Message`s (data/conversations.py); a KoAlpaca row is one user turn and its answer. A format renders a conversation as
`Segment`s of text, each trained (the loss covers it: every answer and its end of turn) or not (the system prompt,
the user turns, the template's headers), and `encode` turns many conversations into token ids and the spans of
trained positions, in batched tokenizer calls.

The koalpaca format (`KoAlpacaFormat`), for base models, extends the walkthrough's template to conversations: a single
turn renders exactly as the walkthrough's, a system prompt gets a `### 시스템:` section after the opening sentence,
and each later turn repeats the `### 지시사항:` / `### 응답:` sections after the previous answer and its EOS:

    <BOS>아래는 작업을 설명하는 지시사항입니다. 이에 대한 적절한 응답을 작성해주세요.

    ### 시스템:
    {system}

    ### 지시사항:
    {user 1}

    ### 응답:{answer 1}<EOS>

    ### 지시사항:
    {user 2}

    ### 응답:{answer 2}<EOS>

The chat format (`ChatTemplateFormat`) is the tokenizer's own chat template (instruct models).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, Literal, NamedTuple

import jinja2
from transformers import PreTrainedTokenizerBase

from qlora_lit.data.conversations import Message, split_turns
from qlora_lit.errors import ConfigError

PromptFormatName = Literal["koalpaca", "chat"]
DEFAULT_FORMAT: PromptFormatName = "koalpaca"

OPENING_WITH_INPUT = "아래는 작업을 설명하는 지시사항과 추가 정보를 제공하는 입력이 짝으로 구성됩니다. 이에 대한 적절한 응답을 작성해주세요.\n\n"
OPENING_NO_INPUT = "아래는 작업을 설명하는 지시사항입니다. 이에 대한 적절한 응답을 작성해주세요.\n\n"
SYSTEM_SECTION = "### 시스템:\n{system}\n\n"
INSTRUCTION_SECTION = "### 지시사항:\n{instruction}\n\n"
INPUT_SECTION = "### 입력:\n{input}\n\n"
ANSWER_HEADER = "### 응답:"
TURN_SEPARATOR = "\n\n"
"""Between an answer's EOS and the next turn's `### 지시사항:`."""

PROMPT_WITH_INPUT = OPENING_WITH_INPUT + INSTRUCTION_SECTION + INPUT_SECTION + ANSWER_HEADER
PROMPT_NO_INPUT = OPENING_NO_INPUT + INSTRUCTION_SECTION + ANSWER_HEADER
"""The walkthrough's two single-turn templates."""


PROBE = (Message("user", "안녕?"), Message("assistant", "안녕하세요."))
"""A conversation rendered to find what the format writes around an answer."""


def build_prompt(instruction: str, input: str | None = None) -> str:
    """The walkthrough's prompt for one instruction; a missing or blank `input` selects the no-input template."""
    return KoAlpacaFormat.first_turn(Message("user", instruction, input))


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered conversation."""

    text: str
    trained: bool
    """Whether the loss covers it (an answer and its end of turn) or not (the prompt: turns other than answers, and
    the template's headers)."""
    special_tokens: bool = False
    """Tokenized with the tokenizer's own special tokens added (its BOS, before a koalpaca conversation)."""
    eos: bool = False
    """Followed by the tokenizer's EOS (after a koalpaca answer, and a chat answer whose template ends turns with no
    special token; other chat templates write their own end of turn)."""


class Tokens(NamedTuple):
    """A conversation's token ids and the [start, end) spans of the positions the loss covers."""

    ids: list[int]
    trained: list[tuple[int, int]]


class PromptFormat:
    """How conversations are rendered for one model; the subclasses are the formats `data.prompt_format` names.

    `segments` renders a conversation that ends with an answer (a training example) or with a user turn (a prompt to
    answer: its text then ends where the answer begins). Every segment of a prompt is the segment training renders
    for that conversation, so generation continues exactly the text the model was trained on.

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
        """The text the model completes to answer the last (user) turn of `messages` (with the EOS after earlier
        answers that get one; without the BOS that the tokenizer adds)."""
        eos = self.tokenizer.eos_token
        return "".join(segment.text + (eos if segment.eos else "") for segment in self.segments(messages))

    def encode(self, conversations: Sequence[Sequence[Message]]) -> list[Tokens]:
        """Token ids of every conversation, and the spans of its trained positions."""
        rendered = [self.segments(messages) for messages in conversations]
        ids = iter(tokenize_segments(self.tokenizer, [segment for segments in rendered for segment in segments]))
        encoded = []
        for segments in rendered:
            tokens = Tokens([], [])
            for segment in segments:
                piece = next(ids)
                if segment.trained and piece:
                    tokens.trained.append((len(tokens.ids), len(tokens.ids) + len(piece)))
                tokens.ids.extend(piece)
            encoded.append(tokens)
        return encoded

    def prompt_ids(self, conversations: Sequence[Sequence[Message]]) -> list[list[int]]:
        """Token ids of the prompts that answer the last (user) turn of each conversation, as training tokenized them."""
        return [tokens.ids for tokens in self.encode(conversations)]

    @cached_property
    def stop_token_ids(self) -> list[int]:
        """The token a trained answer ends with (the EOS after a koalpaca answer, the template's end of turn after a
        chat one, e.g. `<|im_end|>`): where generation stops, found as the last trained token of a probe answer."""
        [probe] = self.encode([PROBE])
        return [probe.ids[probe.trained[-1][1] - 1]]


class KoAlpacaFormat(PromptFormat):
    """The walkthrough's Korean template (### 지시사항 / ### 입력 / ### 응답) extended to conversations (the module's
    docstring shows it), with the tokenizer's BOS before the conversation and its EOS after every answer. The
    opening sentence is the walkthrough's: the one that mentions an input when the first turn has one."""

    name = "koalpaca"

    def template(self) -> str:
        return "".join(
            (OPENING_WITH_INPUT, OPENING_NO_INPUT, SYSTEM_SECTION, INSTRUCTION_SECTION, INPUT_SECTION, ANSWER_HEADER)
            + (TURN_SEPARATOR,)
        )

    def segments(self, messages: Sequence[Message]) -> list[Segment]:
        system, turns = split_turns(messages)
        segments = []
        for number, (user, answer) in enumerate(turns):
            if number == 0:
                segments.append(Segment(self.first_turn(user, system), trained=False, special_tokens=True))
            else:
                segments.append(Segment(TURN_SEPARATOR + self.turn(user), trained=False))
            if answer is not None:
                segments.append(Segment(answer.content, trained=True, eos=True))
        return segments

    @classmethod
    def first_turn(cls, user: Message, system: Message | None = None) -> str:
        """The opening sentence, the system section (when there is a system prompt) and the first user turn."""
        opening = OPENING_WITH_INPUT if has_input(user) else OPENING_NO_INPUT
        return opening + (SYSTEM_SECTION.format(system=system.content) if system else "") + cls.turn(user)

    @staticmethod
    def turn(user: Message) -> str:
        """A user turn's sections, up to the answer's header."""
        text = INSTRUCTION_SECTION.format(instruction=user.content)
        return text + (INPUT_SECTION.format(input=user.input) if has_input(user) else "") + ANSWER_HEADER


def has_input(user: Message) -> bool:
    return bool(user.input and user.input.strip())


class ChatTemplateFormat(PromptFormat):
    """The tokenizer's chat template (instruct models), which places every special token itself.

    Each assistant turn is found by rendering the conversation up to it twice: with the generation prompt (the text
    before the answer) and with the answer (the text after it). The trained segment is the answer with the template's
    own end of turn (e.g. `<|eot_id|>`, `<|im_end|>`: the last special token of the turn; the tokenizer's EOS after a
    template that ends turns with plain text), so the model learns to stop where the template says a turn ends; what
    the template writes after that token (ChatML's newline) belongs to the next turn's prompt. transformers'
    `return_assistant_tokens_mask` would find the same spans, but only in templates marked with `{% generation %}`,
    which few models ship; rendering prefixes works for any template whose earlier turns render the same whatever
    follows them, and the others are refused with a message.
    """

    name = "chat"

    def template(self) -> str:
        return str(self.tokenizer.chat_template)

    def segments(self, messages: Sequence[Message]) -> list[Segment]:
        split_turns(messages)  # refuses a conversation out of order
        segments, done = [], ""
        for index, message in enumerate(messages):
            if message.role == "assistant":
                prompt = self.render(messages[:index], add_generation_prompt=True) + self.unwritten_header
                full = self.render(messages[: index + 1])
                answer = self.answer_segment(self.after(prompt, full))
                segments += [Segment(self.after(done, prompt), trained=False), answer]
                done = prompt + answer.text
        asking = messages[-1].role == "user"
        end = self.render(messages, add_generation_prompt=asking) + (self.unwritten_header if asking else "")
        segments.append(Segment(self.after(done, end), trained=False))
        return [segment for segment in segments if segment.text or segment.eos]

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        turns = [{"role": message.role, "content": message.text()} for message in messages]
        try:
            return self.tokenizer.apply_chat_template(
                turns, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except jinja2.TemplateError as err:  # e.g. a template that raises "System role not supported"
            roles = [message.role for message in messages]
            raise ConfigError(
                f"the tokenizer's chat template cannot render a conversation of the roles {roles}: {err}"
            ) from err

    @staticmethod
    def after(prefix: str, text: str) -> str:
        """`text` past `prefix`, which it must start with: the template renders each conversation's beginning as it
        renders the shorter conversation."""
        if not text.startswith(prefix):
            raise ConfigError(
                "the tokenizer's chat template renders the beginning of a conversation differently once later turns "
                "follow (some templates drop earlier reasoning, or mark the last turn), so its turns cannot be marked "
                "for the loss; use data.prompt_format: koalpaca, or a model whose template renders each turn the same"
            )
        return text[len(prefix) :]

    def answer_segment(self, turn: str) -> Segment:
        """An assistant turn as rendered, as the trained segment: up to its last special token (the end of turn); what
        follows (whitespace before the next turn) belongs to the next prompt. A template that ends turns with no
        special token (plain `USER: ...` / `ASSISTANT: ...` text) gets the tokenizer's EOS after the answer's text, as
        the koalpaca format does, or the model would never learn to stop."""
        ends = [turn.rfind(token) + len(token) for token in self.special_tokens if token in turn]
        if ends:
            return Segment(turn[: max(ends)], trained=True)
        return Segment(turn.rstrip(), trained=True, eos=True)

    @cached_property
    def unwritten_header(self) -> str:
        """The assistant's role header (e.g. `<|im_start|>assistant\n`) of a template that has no
        `add_generation_prompt` branch, which writes it only together with an answer: without it here the header
        would be trained as part of the answer and missing from prompts. Empty for other templates, and for those
        whose answer follows the user's turn directly (`[INST] ... [/INST]`)."""
        user, answer = PROBE
        asked = self.render([user], add_generation_prompt=True)
        if asked != self.render([user]):
            return ""
        turn = self.after(asked, self.render([user, answer]))
        header = turn[: turn.find(answer.content)] if answer.content in turn else ""
        return header if header.strip() else ""

    @cached_property
    def special_tokens(self) -> set[str]:
        added = {token.content for token in self.tokenizer.added_tokens_decoder.values() if token.special}
        return added | set(self.tokenizer.all_special_tokens)


FORMATS: dict[str, type[PromptFormat]] = {cls.name: cls for cls in (KoAlpacaFormat, ChatTemplateFormat)}


def check_format_name(name: str) -> None:
    if name not in FORMATS:
        raise ConfigError(f"data.prompt_format must be one of {list(FORMATS)}, got {name!r}")


def trained_format_name(run_config: dict[str, Any]) -> str:
    """The format a run trained with, as its saved config names it (koalpaca for runs older than the setting)."""
    return (run_config.get("data") or {}).get("prompt_format") or DEFAULT_FORMAT


def trained_system_prompt(run_config: dict[str, Any]) -> str | None:
    """The default system prompt a run trained with (`data.system_prompt`), to prompt its adapter the same way."""
    return (run_config.get("data") or {}).get("system_prompt") or None


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

"""Conversations: what every training row and every prompt is, and how rows of each shape become one.

A conversation is a list of messages: at most one system message, first, then user and assistant turns alternating,
starting with the user's. A training row ends with an answer (the assistant's turn); a prompt to answer ends with the
user's turn. Rows come in three shapes, recognised with no setting:

- OpenAI-style `messages`: `[{"role": "system" | "user" | "assistant", "content": "..."}, ...]`
- ShareGPT-style `conversations`: `[{"from": "system" | "human" | "gpt", "value": "..."}, ...]`
- KoAlpaca rows: `instruction`, optional `input`, `output` (one user turn and its answer), optional `system`

A conversation cell holds a list of objects (JSON, Parquet, `save_to_disk` folders, hub datasets) or, in a CSV file
(whose cells are text), that list written as JSON. `data.columns` names other columns (`messages: dialog`) and other
keys inside the messages (`role: speaker, content: text`). A row that breaks the rules above (an unknown role, no
answer, an empty message, roles out of order) is a `BadRow`; the data module stops at it or skips it (`data.bad_rows`).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from qlora_lit.data.json_text import DuplicateKey, parse_json

Role = Literal["system", "user", "assistant"]
ROLE_NAMES: dict[str, Role] = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
}
"""The role names rows may use (OpenAI's and ShareGPT's), and the role each stands for."""
CONVERSATION_COLUMNS = ("messages", "conversations")
"""Columns that hold conversations, in the order they are looked for."""
MESSAGE_KEYS = (("role", "content"), ("from", "value"))
"""The keys of a message's role and text: OpenAI's, then ShareGPT's."""


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: Role
    content: str
    input: str | None = None
    """A user turn's extra input (a KoAlpaca row's `input`): the koalpaca template has a section of its own for it,
    other templates get it after the content, past a blank line (`text`)."""

    def text(self) -> str:
        """The content, and the input (when there is one) after a blank line: the turn as one text."""
        return f"{self.content}\n\n{self.input}" if self.input and self.input.strip() else self.content


Conversation = tuple[Message, ...]


class BadRow(ValueError):
    """A row that is not a usable conversation; the message says why."""


def row_messages(
    instruction: str, input: str | None = None, output: str | None = None, system: str | None = None
) -> Conversation:
    """A KoAlpaca row as a conversation: its system prompt (when given), one user turn and, to train on, its answer.
    A blank `input` is none, as a conversation row's user turn has: the same question deduplicates across shapes."""
    head = (Message("system", system),) if system and system.strip() else ()
    user = Message("user", instruction, input if input and input.strip() else None)
    return (*head, user) if output is None else (*head, user, Message("assistant", output))


def with_system(messages: Sequence[Message], system: str | None) -> Conversation:
    """`messages` with `system` as their system prompt when they have none (`data.system_prompt`)."""
    if not messages or not system or not system.strip() or messages[0].role == "system":
        return tuple(messages)
    return (Message("system", system), *messages)


def order_problem(roles: Sequence[str], answered: bool = True) -> str | None:
    """What is wrong with the order of a conversation's roles, or None. `answered`: a training row, which ends with
    the assistant's turn; otherwise a prompt, which ends with the user's (the turn to answer)."""
    system = 1 if roles and roles[0] == "system" else 0
    turns = list(roles[system:])
    if "system" in turns:
        return f"message {turns.index('system') + system + 1} is a system message; only the first message may be one"
    if not turns:
        return "it has no user turn"
    if turns[0] != "user":
        return f"message {system + 1} is the assistant's; the first turn must be the user's"
    for number, (role, following) in enumerate(itertools.pairwise(turns), start=system + 1):
        if role == following:
            return f"messages {number} and {number + 1} are both {role} turns; user and assistant must alternate"
    if answered and turns[-1] != "assistant":
        return "it has no assistant turn to train on" if len(turns) == 1 else "it ends with a user turn, unanswered"
    if not answered and turns[-1] != "user":
        return "it ends with the assistant's turn; the last turn must be the user's, the one to answer"
    return None


def split_turns(messages: Sequence[Message]) -> tuple[Message | None, list[tuple[Message, Message | None]]]:
    """The system message (or None) and the (user, answer) pairs; the last answer is None when the conversation ends
    with the user's turn (a prompt)."""
    problem = order_problem([message.role for message in messages], answered=messages[-1].role == "assistant")
    if problem:
        raise ValueError(f"not a conversation: {problem}")
    system = messages[0] if messages[0].role == "system" else None
    turns = list(messages[1:] if system else messages)
    return system, [(turns[i], turns[i + 1] if i + 1 < len(turns) else None) for i in range(0, len(turns), 2)]


def drop_earlier_turns(messages: Sequence[Message], kept: int) -> Conversation:
    """The system message (if any) and the last `kept` user/assistant turns of a training conversation."""
    system, turns = split_turns(messages)
    return ((system,) if system else ()) + tuple(m for pair in turns[len(turns) - kept :] for m in pair if m)


def assistant_turns(messages: Sequence[Message]) -> int:
    return sum(message.role == "assistant" for message in messages)


def conversation_column(columns: Sequence[str], mapping: Mapping[str, str] | None = None) -> str | None:
    """The column of a table that holds its conversations: `data.columns.messages`, else `messages` or
    `conversations`; None for KoAlpaca-shaped tables (or when `mapping` names their columns)."""
    mapping = mapping or {}
    if "messages" in mapping:
        return mapping["messages"]
    if {"instruction", "input", "output"} & mapping.keys():
        return None
    return next((name for name in CONVERSATION_COLUMNS if name in columns), None)


def parse_messages(value: object, keys: tuple[str, str] | None = None, answered: bool = True) -> Conversation:
    """One conversation cell as messages. `keys`: the role and text keys (`data.columns.role`/`content`); by default
    each message's own, OpenAI's or ShareGPT's. An empty cell gives no messages (the row counts as empty); anything
    that is not a conversation raises BadRow. An empty system message means no system prompt."""
    items = as_list(value)
    messages = []  # empty system messages too, until the order is checked
    for number, item in enumerate(items, start=1):
        if not isinstance(item, Mapping):
            raise BadRow(f"message {number} is {short_json(item)}, not an object with a role and a text")
        role_key, text_key = keys or message_keys(item, number)
        name, text = item.get(role_key), item.get(text_key)
        role = ROLE_NAMES.get(name) if isinstance(name, str) else None
        if role is None:
            raise BadRow(
                f"message {number} has the role {short_json(name)} under {role_key!r}; known roles are "
                f"{sorted(ROLE_NAMES)} (system; user or human; assistant or gpt)"
            )
        if not isinstance(text, str):
            raise BadRow(f"message {number} ({name}) has {short_json(text)} under {text_key!r}, not text")
        if not text.strip() and role != "system":
            raise BadRow(f"message {number} ({name}) is empty")
        messages.append(Message(role, text))
    problem = order_problem([message.role for message in messages], answered) if messages else None
    if problem:
        raise BadRow(problem)
    return tuple(message for message in messages if message.content.strip())


def as_list(value: object) -> list:
    """A conversation cell's items: a list (numpy's arrays from Parquet and datasets, too), or JSON text of one."""
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, str):
        if not value.strip():
            return []
        try:
            value = parse_json(value)
        except json.JSONDecodeError as err:
            raise BadRow(f"its text is not a JSON list of messages ({err.msg}): {value[:60]!r}") from None
        except DuplicateKey as err:
            raise BadRow(str(err)) from None
    if isinstance(value, (list, tuple, np.ndarray)):
        return list(value)
    raise BadRow(f"it holds {short_json(value)}, not a list of messages")


def message_keys(item: Mapping, number: int) -> tuple[str, str]:
    """A message's role and text keys: OpenAI's or ShareGPT's, whichever it has. A key whose value is None counts as
    absent: Arrow (Parquet, datasets) gives the messages of a column that mixes both every key of both."""
    for role_key, text_key in MESSAGE_KEYS:
        if item.get(role_key) is not None:
            return role_key, text_key
    raise BadRow(
        f"message {number} has neither a 'role' nor a 'from' key (its keys: {sorted(map(str, item))}); name the "
        "keys with data.columns, e.g. {role: speaker, content: text}"
    )


def short_json(value: object) -> str:
    """A value as the file has it, short."""
    shown = json.dumps(value, ensure_ascii=False, default=str)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def row_labels(table: pd.DataFrame) -> list[str]:
    """Where each row of a table is in its file, for messages: its line, item or row number when the reader recorded
    it (as the table's index), else its row number from 1."""
    if table.index.name:
        return [f"{table.index.name} {label}" for label in table.index]
    return [f"row {number}" for number in range(1, len(table) + 1)]


def to_json(messages: Sequence[Message]) -> str:
    """A conversation as JSON text (the token cache keeps it), read back by `from_json`."""
    return json.dumps([[m.role, m.content, m.input] for m in messages], ensure_ascii=False)


def from_json(text: str) -> Conversation:
    return tuple(Message(role, content, input) for role, content, input in json.loads(text))

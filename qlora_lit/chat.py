"""Talk with a trained adapter (or a bare base model) in the terminal, turn after turn.

python -m qlora_lit chat --adapter runs/demo_chat/version_0/adapter
python -m qlora_lit chat --model meta-llama/Llama-3.2-1B          # the base before training

Type a message and Enter; the answer is printed as it is generated. At every turn the whole conversation goes to the
model in the prompt format and with the system prompt the adapter was trained with (its run's data.prompt_format and
data.system_prompt): it sees what training showed it. When the conversation would no longer fit the context
(`max_context` tokens, the answer's `generation.max_new_tokens` included), its earliest turns are forgotten, the system
prompt kept, as training shortens long conversations; a message too long even alone is refused, nothing forgotten.

Commands: /reset starts a new conversation, /system TEXT sets the system prompt (and starts a new conversation;
/system alone removes it), /exit (or Ctrl-D) ends the session.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from qlora_lit.data.conversations import Conversation, Message, with_system
from qlora_lit.data.inference import left_pad
from qlora_lit.data.prompts import PromptFormat, PromptFormatName, trained_format_name, trained_system_prompt
from qlora_lit.decoding import GenerationArgs, generate_texts
from qlora_lit.errors import ConfigError
from qlora_lit.generate import DTypeChoice, load_for_generation

HELP = "/reset: a new conversation · /system TEXT: set the system prompt · /exit: quit (or Ctrl-D)"
USER_PROMPT = "사용자> "
MODEL_PROMPT = "모델> "


@dataclass
class ChatSession:
    """A conversation kept across turns: the system prompt and the (question, answer) turns so far.

    Args:
        prompt_format: how conversations are rendered (the one the adapter was trained with).
        system: the system prompt, or None.
        budget: longest prompt in tokens: the model's context less the room left for the answer.
    """

    prompt_format: PromptFormat
    system: str | None
    budget: int
    turns: list[tuple[str, str]] = field(default_factory=list)

    def messages(self, question: str, forgotten: int = 0) -> Conversation:
        """The conversation so far, less its `forgotten` earliest turns, and `question`, to be answered."""
        turns = self.turns[forgotten:]
        history = [m for asked, answer in turns for m in (Message("user", asked), Message("assistant", answer))]
        return with_system((*history, Message("user", question)), self.system)

    def check_system(self, system: str | None) -> None:
        """Raise ConfigError if the prompt format cannot render a conversation with `system` (templates without a
        system role refuse one)."""
        self.prompt_format.prompt_ids([with_system((Message("user", "?"),), system)])

    def prompt_ids(self, question: str) -> tuple[list[int] | None, int]:
        """Token ids of the prompt that answers `question`, after forgetting as few of the earliest turns as it takes
        to fit the budget, and how many were forgotten; None (and nothing forgotten) when `question` alone does not
        fit."""
        for forgotten in range(len(self.turns) + 1):
            [ids] = self.prompt_format.prompt_ids([self.messages(question, forgotten)])
            if len(ids) <= self.budget:
                del self.turns[:forgotten]
                return ids, forgotten
        return None, 0


def chat(
    adapter: str | None = None,
    model: str | None = None,
    prompt_format: PromptFormatName | None = None,
    system: str | None = None,
    max_context: int | None = None,
    quantize: Literal["4bit", "none"] = "4bit",
    dtype: DTypeChoice = "auto",
    generation: GenerationArgs = GenerationArgs(),  # noqa: B008 - frozen-by-convention settings
    device: str = "auto",
    seed: int | None = None,
    trust_remote_code: bool = False,
) -> list[tuple[str, str]]:
    """Talk with a trained adapter (or a base model) in the terminal; /reset, /system TEXT and /exit are commands.

    Args:
        adapter: a trained adapter folder (runs/NAME/version_N/adapter); its base, prompt format and system prompt
            come with it.
        model: base model (hub id or folder): alone, to talk with it untrained; with `adapter`, instead of the trained
            base.
        prompt_format: template the conversation is kept in; default: the one the adapter was trained with, else
            koalpaca.
        system: system prompt; default: the adapter's (its run's data.system_prompt); "" for none.
        max_context: longest conversation in tokens, the answer included; earlier turns are forgotten beyond it.
            Default: the model's context (max_position_embeddings).
        quantize: load the base in 4 bits as in training, or unquantized (`none`) in `dtype`.
        dtype: compute dtype; auto is bf16 on Ampere or newer GPUs, fp16 on older ones (V100, T4), fp32 on a CPU.
        generation: decoding settings (max_new_tokens is each answer's limit).
        device: cuda, cuda:1, cpu, or auto (the first GPU if there is one).
        seed: seed for sampling, for repeatable answers.
        trust_remote_code: run Python code shipped with the base model. Only for models you trust; never taken from
            the adapter's or model's saved config.

    Returns the session's turns, (question, answer), those forgotten or reset included.
    """
    if max_context is not None and max_context <= generation.max_new_tokens:
        raise ConfigError(
            f"max_context={max_context} leaves no room for a question beside generation.max_new_tokens="
            f"{generation.max_new_tokens}"
        )
    loaded, tokenizer, run_config = load_for_generation(adapter, model, quantize, dtype, device, trust_remote_code)
    context = max_context or model_context(loaded, tokenizer)
    session = ChatSession(
        PromptFormat.named(prompt_format or trained_format_name(run_config), tokenizer),
        trained_system_prompt(run_config) if system is None else system or None,
        context - generation.max_new_tokens,
    )
    session.check_system(session.system)  # a template without a system role: said before the first message
    if seed is not None:
        torch.manual_seed(seed)
    print(f"{HELP}\n(system prompt: {session.system!r}, context {context} tokens)", flush=True)
    return converse(session, loaded, tokenizer, generation)


def model_context(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """The longest sequence the model takes: its config's max_position_embeddings, else the tokenizer's limit."""
    context = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    if not context or context > 10**7:  # transformers' "no limit" is a huge number
        raise ConfigError("the model's config does not say how long its context is; give --max_context")
    return context


def converse(
    session: ChatSession, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, generation: GenerationArgs
) -> list[tuple[str, str]]:
    """Read lines from stdin until /exit or its end, answering each message (streamed to stdout)."""
    said: list[tuple[str, str]] = []
    while True:
        try:
            line = input(USER_PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return said
        if line == "/exit":
            return said
        if line.startswith("/"):
            print(command(session, line), flush=True)
        elif line:
            answer = reply(session, model, tokenizer, generation, line)
            if answer is not None:
                said.append((line, answer))


def command(session: ChatSession, line: str) -> str:
    """Carry out a /command; what to tell the user."""
    name, _, argument = line.partition(" ")
    if name == "/reset":
        session.turns.clear()
        return "(a new conversation)"
    if name == "/system":
        try:
            session.check_system(argument.strip() or None)
        except ConfigError as err:
            return f"({err}; the system prompt stays {session.system!r})"
        session.system, session.turns = argument.strip() or None, []
        return f"(system prompt: {session.system!r}; a new conversation)"
    return f"(unknown command {name}) {HELP}"


def reply(
    session: ChatSession,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    generation: GenerationArgs,
    question: str,
) -> str | None:
    """Answer `question` in the conversation, streaming the answer; None when it could not be asked."""
    ids, forgotten = session.prompt_ids(question)
    if forgotten:
        print(f"(the {forgotten} earliest turn(s) no longer fit the context and are forgotten)", flush=True)
    if ids is None:
        print(
            f"(the message is longer than the context allows, {session.budget} tokens; say it shorter: the "
            "conversation so far is kept)",
            flush=True,
        )
        return None
    print(MODEL_PROMPT, end="", flush=True)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    try:
        batch = left_pad(tokenizer, [ids])
        stop = session.prompt_format.stop_token_ids
        [answer] = generate_texts(model, tokenizer, batch, generation, streamer, stop_token_ids=stop)
    except KeyboardInterrupt:  # Ctrl-C stops this answer, not the session
        print("\n(interrupted: the question is not kept)", file=sys.stderr, flush=True)
        return None
    session.turns.append((question, answer))
    return answer

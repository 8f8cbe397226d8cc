"""How answers are decoded: the decoding settings (`generate --generation.*`, `model.generation` for `predict`) and
the batched generation that `generate` and `predict` share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from qlora_lit.errors import ConfigError

SAMPLING_PENALTY = 1.2  # the walkthrough's repetition penalty, with its sampling settings


@dataclass
class GenerationArgs:
    """How answers are decoded (the walkthrough's sampling settings by default)."""

    max_new_tokens: int = 256
    """Longest answer in tokens; generation stops earlier where a trained answer ends (the EOS, or the chat template's
    end of turn)."""
    do_sample: bool = True
    """Sample the next token; false decodes greedily (deterministic) and ignores temperature, top_k and top_p."""
    temperature: float = 0.2
    """Sampling temperature: lower is closer to greedy."""
    top_k: int = 50
    """Sample among the k most likely tokens."""
    top_p: float = 0.95
    """Sample among the most likely tokens whose probabilities add up to p."""
    repetition_penalty: float | None = None
    """Penalty on tokens already in the text (1.0: none); unset: the walkthrough's 1.2 when sampling, none when
    decoding greedily (then the answer is plain greedy decoding's, as in-training samples and plain PEFT give)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise ConfigError(f"generation.repetition_penalty must be > 0 (1.0: none), got {self.repetition_penalty}")
        if self.top_k < 0:
            raise ConfigError(f"generation.top_k must be >= 0 (0: no top-k limit), got {self.top_k}")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ConfigError("generation.temperature must be > 0 and generation.top_p in (0, 1] when sampling")

    @property
    def penalty(self) -> float:
        if self.repetition_penalty is not None:
            return self.repetition_penalty
        return SAMPLING_PENALTY if self.do_sample else 1.0

    def to_generation_config(
        self, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, stop_token_ids: Sequence[int] = ()
    ) -> GenerationConfig:
        """The settings for `model.generate`, stopping at `eos_token_ids(tokenizer, model, stop_token_ids)`. use_cache:
        training switched the model config's cache off."""
        sampling = {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            repetition_penalty=self.penalty,
            eos_token_id=eos_token_ids(tokenizer, model, stop_token_ids),
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
            **(sampling if self.do_sample else {}),
        )


def eos_token_ids(
    tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, stop_token_ids: Sequence[int]
) -> list[int]:
    """The tokens generation stops at: the tokenizer's EOS, the tokens trained answers end with (the prompt format's
    `stop_token_ids`: e.g. a chat template's `<|im_end|>`, which the EOS may not be) and the model's own stop tokens
    (an instruct model's end of turn)."""
    model_eos = model.generation_config.eos_token_id
    model_eos = model_eos if isinstance(model_eos, list) else [model_eos]
    return list(dict.fromkeys(t for t in [tokenizer.eos_token_id, *stop_token_ids, *model_eos] if t is not None))


def generate_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch: dict[str, torch.Tensor],
    args: GenerationArgs,
    streamer: TextStreamer | None = None,
    *,
    stop_token_ids: Sequence[int],
) -> list[str]:
    """Answers to a batch of left-padded prompts: the new tokens only, decoded, up to where a trained answer ends
    (the prompt format's `stop_token_ids`) or at the EOS.

    Compiled decoder layers run eagerly here: compiled for training's shapes, they would recompile for every
    prompt length and KV-cache size (and hit dynamo's recompile limit) for a few forward passes.
    """
    input_ids = batch["input_ids"].to(model.device)
    with torch.inference_mode(), torch.compiler.set_stance("force_eager"):
        output = model.generate(
            input_ids=input_ids,
            attention_mask=batch["attention_mask"].to(model.device),
            generation_config=args.to_generation_config(tokenizer, model, stop_token_ids),
            streamer=streamer,
        )
    answers = tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)
    return [answer.strip() for answer in answers]

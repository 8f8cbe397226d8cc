"""Greedy answers to fixed prompts at each validation, as TensorBoard text: watch the model learn to answer."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from qlora_lit.data.inference import encode_prompts, left_pad
from qlora_lit.data.prompts import DEFAULT_FORMAT, PromptFormat
from qlora_lit.decoding import eos_token_ids
from qlora_lit.text_log import as_prose, log_text
from qlora_lit.tokenizer import load_tokenizer

DEFAULT_PROMPTS = (
    "한국의 아이돌 문화에 대해 알려줘.",
    "김치찌개를 맛있게 끓이는 방법을 알려줘.",
    "서울에서 가볼 만한 곳을 추천해줘.",
)


@torch.no_grad()
def greedy_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    instructions: list[str],
    max_new_tokens: int,
    synced: bool = False,
    prompt_format: str = DEFAULT_FORMAT,
    system_prompt: str | None = None,
) -> list[str]:
    """The model's greedy continuations of the training prompts for `instructions`, without the prompts.

    The prompts are those training used (`prompt_format` and `system_prompt`, through the same code as `generate`),
    all in one batch,
    padded on the left so that every row continues right after its own prompt.
    `synced`: every rank generates and each runs as many forward passes as the longest (sharded models, whose every
    forward gathers weights from all ranks).
    """
    rows = [{"instruction": instruction} for instruction in instructions]
    inputs = left_pad(tokenizer, encode_prompts(tokenizer, rows, prompt_format, system_prompt))
    inputs = {key: value.to(model.device) for key, value in inputs.items()}
    # A config of its own: the model's may ask for sampling (temperature, top_p), which greedy search would warn about.
    greedy = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,  # training turns the cache off; generating token by token needs it
        eos_token_id=eos_token_ids(tokenizer, model, PromptFormat.named(prompt_format, tokenizer).stop_token_ids),
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.compiler.set_stance("force_eager"):  # see decoding.generate_texts: no recompiling of training's layers
        output = model.generate(**inputs, generation_config=greedy, synced_gpus=synced)
    return tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


class SampleGenerations(Callback):
    """At the end of each validation (the sanity check too: the untrained model's answers are the baseline), rank 0
    answers each prompt greedily and logs TensorBoard text `samples/<i>`, one tag per prompt, at the global step.
    Under FSDP every rank generates along (each layer's forward gathers its shards from all ranks), with the
    weights outside the decoder layers (embeddings, final norm, head) gathered for the whole generation.

    Generation runs in eval mode under the trainer's precision, and neither changes the model's mode nor draws from
    the random streams that training uses (a resumed run must continue exactly like an uninterrupted one).

    Args:
        prompts: instructions, put into the training prompt template (data.prompt_format, with data.system_prompt);
            empty turns samples off.
        max_new_tokens: length limit of each answer; keep it short, validation waits for it.
    """

    def __init__(self, prompts: Sequence[str] = DEFAULT_PROMPTS, max_new_tokens: int = 64) -> None:
        self.prompts = list(prompts)
        self.max_new_tokens = max_new_tokens

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sharded = isinstance(trainer.strategy, FSDPStrategy)  # QLoRAFSDPStrategy: two or more ranks
        if not (trainer.is_global_zero or sharded) or not self.prompts or pl_module.model is None:
            return
        tokenizer = getattr(trainer.datamodule, "tokenizer", None) or load_tokenizer(
            pl_module.model_name_or_path, pl_module.trust_remote_code
        )
        model = pl_module.model
        was_training = model.training
        cuda_devices = [model.device] if model.device.type == "cuda" else []
        try:
            model.eval()
            with (
                torch.random.fork_rng(devices=cuda_devices),
                trainer.precision_plugin.forward_context(),
                root_weights_gathered(trainer.strategy.model) if sharded else nullcontext(),
            ):
                answers = greedy_answers(
                    model,
                    tokenizer,
                    self.prompts,
                    self.max_new_tokens,
                    synced=sharded,
                    prompt_format=getattr(trainer.datamodule, "prompt_format", DEFAULT_FORMAT),
                    system_prompt=getattr(trainer.datamodule, "system_prompt", None),
                )
        finally:
            model.train(was_training)
        if not trainer.is_global_zero:
            return
        for index, (prompt, answer) in enumerate(zip(self.prompts, answers, strict=True)):
            text = f"**{as_prose(prompt)}**\n\n{as_prose(answer.strip())}"
            log_text(trainer, f"samples/{index}", text, step=trainer.global_step)


def root_weights_gathered(fsdp_root: torch.nn.Module):
    """The parameters FSDP's root unit holds itself, gathered (not those of the nested units). Training gathers
    them in the root's forward, but generation calls the wrapped model's `generate`, which bypasses it."""
    return FullyShardedDataParallel.summon_full_params(fsdp_root, recurse=False, writeback=False)

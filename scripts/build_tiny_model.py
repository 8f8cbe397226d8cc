"""Rebuild `qlora_lit/assets/tiny-llama`: a byte-level BPE tokenizer and a tiny Llama trained on the shipped sample.

    python scripts/build_tiny_model.py            # about a minute on 2 CPU cores

The tokenizer is trained on the sample's text (templates included). The model is a 2-layer Llama, briefly
pre-trained on the sample's plain instruction and answer text (no template, no EOS), so that fine-tuning has
something to adapt: it learns the prompt format and when to stop. Like Llama 3, the tokenizer has a BOS and an
EOS token and no pad token.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from qlora_lit.data.prompts import build_prompt

ASSETS = Path(__file__).resolve().parents[1] / "qlora_lit" / "assets"
SAMPLE = ASSETS / "koalpaca_sample.jsonl"
OUTPUT = ASSETS / "tiny-llama"
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
VOCAB_SIZE = 2048
SEED = 0


def read_rows() -> list[dict]:
    return [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, model_max_length=1024)


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def pretrain(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, texts: list[str], steps: int = 300) -> None:
    """Next-token training on a stream of the plain texts cut into 128-token windows."""
    stream = [token for text in texts for token in tokenizer(text)["input_ids"]]
    windows = torch.tensor(stream[: len(stream) // 128 * 128]).view(-1, 128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for step in range(steps):
        batch = windows[torch.randint(len(windows), (16,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"pretrain step {step}: loss {loss.item():.3f}")


def main() -> None:
    random.seed(SEED)
    torch.manual_seed(SEED)
    rows = read_rows()
    plain = [f"{row['instruction']}\n{row.get('input', '')}\n{row['output']}" for row in rows]
    templated = [build_prompt(row["instruction"], row.get("input")) + row["output"] for row in rows]
    tokenizer = train_tokenizer(plain + templated)
    model = build_model(tokenizer)
    pretrain(model, tokenizer, plain)
    model.to(torch.bfloat16).save_pretrained(OUTPUT)
    tokenizer.save_pretrained(OUTPUT)
    print(f"wrote {OUTPUT}: {sum(p.numel() for p in model.parameters()):,} parameters, vocabulary {len(tokenizer)}")


if __name__ == "__main__":
    main()

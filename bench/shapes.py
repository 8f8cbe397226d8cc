"""Model shapes for the benchmark, and a random-initialised copy of each on disk.

Run (once per shape; later calls reuse the folder):

    python -m bench.shapes --shape llama-3.1-8b --model_dir bench/.cache/models/llama-3.1-8b --device cuda
    python -m bench.shapes --shape tiny --model_dir bench/.cache/models/tiny --device cpu

No hub access: the configs below copy the published Llama 3.x `config.json` shapes (vocabulary
128,256, GQA with 8 KV heads, llama3 RoPE scaling). Random weights cost the same FLOPs and memory
as trained ones. The model is built in bf16 directly on the target device (no slow fp32 CPU init),
saved once with `save_pretrained`, and every system then loads the same weights with
`from_pretrained(folder, quantization_config=...)`.

The data are token ids (see data.py), so no real tokenizer is needed; `make_tokenizer` builds a
stand-in with Llama 3's special-token ids (BOS 128000, EOS 128001, no pad token) for the APIs that
insist on one (`tokenizer.pad`, TRL's `processing_class`), and the words t1 ... t127999 as ids 1 ...
127999, so text made of them (scaling.py's data for the CLI) tokenizes one word to one token. It is
saved beside the weights.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

VOCAB = 128256
BOS_ID = 128000  # <|begin_of_text|>
EOS_ID = 128001  # <|end_of_text|> (base models' EOS; Llama 3 ships no pad token)
FIRST_SPECIAL_ID = 128000  # ids 128000..128255 are reserved/special

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_act="silu",
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    attention_bias=False,
    mlp_bias=False,
    initializer_range=0.02,
)

SHAPES: dict[str, dict] = {
    # meta-llama/Llama-3.2-1B config.json
    "llama-3.2-1b": dict(
        _COMMON,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=32.0,
            high_freq_factor=4.0,
            low_freq_factor=1.0,
            original_max_position_embeddings=8192,
        ),
    ),
    # meta-llama/Llama-3.1-8B config.json
    "llama-3.1-8b": dict(
        _COMMON,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            high_freq_factor=4.0,
            low_freq_factor=1.0,
            original_max_position_embeddings=8192,
        ),
    ),
    # meta-llama/Llama-3.1-70B config.json (FSDP-QLoRA: its 4-bit base does not fit one 24 GB GPU)
    "llama-3.1-70b": dict(
        _COMMON,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            high_freq_factor=4.0,
            low_freq_factor=1.0,
            original_max_position_embeddings=8192,
        ),
    ),
    # CPU smoke tests: same vocabulary (so the same data files work), tiny body. Dimensions are
    # multiples of 64 so bitsandbytes NF4 blocks fit.
    "tiny": dict(
        _COMMON,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=False,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            high_freq_factor=4.0,
            low_freq_factor=1.0,
            original_max_position_embeddings=8192,
        ),
    ),
}


def make_config(shape: str):
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; choose from {sorted(SHAPES)}")
    return LlamaConfig(**SHAPES[shape])


def n_params(shape: str) -> dict[str, int]:
    """Parameter counts (for MFU: 'body' = the matmul weights a token passes through)."""
    c = SHAPES[shape]
    h, i, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    hd, nq, nkv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    attn = h * hd * nq * 2 + h * hd * nkv * 2
    mlp = 3 * h * i
    layers = L * (attn + mlp + 2 * h)
    embed = VOCAB * h
    lm_head = 0 if c["tie_word_embeddings"] else VOCAB * h
    return {
        "layers": layers,
        "embed": embed,
        "lm_head_untied": lm_head,
        "total": layers + embed + lm_head + h,
        "matmul_per_token": L * (attn + mlp) + VOCAB * h,
    }


def make_tokenizer():
    """A stand-in tokenizer: Llama 3's special ids, and one token per word `t<id>` (anything else is <unk>, id 0)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"t{i}": i for i in range(1, FIRST_SPECIAL_ID)}}
    vocab.update({"<|begin_of_text|>": BOS_ID, "<|end_of_text|>": EOS_ID})
    tk = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        unk_token="<unk>",
        padding_side="right",
        model_max_length=131072,
    )
    return tok


def build_model_dir(shape: str, model_dir: str, device: str = "cpu", seed: int = 0) -> str:
    """Create `model_dir` with random bf16 weights of `shape` unless it already holds them."""
    marker = os.path.join(model_dir, "config.json")
    if os.path.exists(marker):
        from transformers import AutoConfig

        got = AutoConfig.from_pretrained(model_dir)
        want = make_config(shape)
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"):
            if getattr(got, k) != getattr(want, k):
                raise SystemExit(f"{model_dir} holds another shape ({k}={getattr(got, k)}); remove it")
        return model_dir

    from transformers import LlamaForCausalLM

    t0 = time.time()
    torch.manual_seed(seed)
    cfg = make_config(shape)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)  # parameters allocated and initialised on `device`
    finally:
        torch.set_default_dtype(prev)
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    tmp = model_dir.rstrip("/") + ".partial"
    os.makedirs(os.path.dirname(os.path.abspath(tmp)), exist_ok=True)
    model.save_pretrained(tmp, max_shard_size="5GB")
    make_tokenizer().save_pretrained(tmp)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    os.replace(tmp, model_dir)
    print(f"built {shape} in {model_dir} ({time.time() - t0:.0f}s)", flush=True)
    return model_dir


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", required=True, choices=sorted(SHAPES))
    p.add_argument("--model_dir", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    build_model_dir(a.shape, a.model_dir, a.device)
    print(n_params(a.shape))


if __name__ == "__main__":
    main()

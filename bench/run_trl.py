"""Baseline 2: TRL's `SFTTrainer` (TRL 1.16) on the same NF4 model, LoRA settings and data, timed.

Run (GPU), one variant per process:

    python -m bench.run_trl --shape llama-3.1-8b --mode padding --out results.jsonl            # batch 8 x accum 8
    python -m bench.run_trl --shape llama-3.1-8b --mode padding --liger --out results.jsonl
    python -m bench.run_trl --shape llama-3.1-8b --mode packing --no_gc --out results.jsonl  # 4096-token rows, 1 x 4
    python -m bench.run_trl --shape llama-3.1-8b --mode packing --liger --out results.jsonl
    python -m bench.run_trl --shape llama-3.1-8b --mode padding_free --no_gc --out results.jsonl  # 8 x accum 8

CPU smoke test (tiny shape; Liger's Triton kernels need a GPU, so leave --liger off on CPU):

    python -m bench.run_trl --shape tiny --device cpu --max_length 128 --n_examples 64 --mode padding \
        --max_steps 4 --batch 2 --accum 2
    python -m bench.run_trl --shape tiny --device cpu --max_length 128 --n_examples 64 --mode packing \
        --pack_length 512 --max_steps 4 --accum 1

How TRL is used (its documented QLoRA path, not the walkthrough's): the model is passed as a path
with `quantization_config` (NF4, double quant, bf16 compute) and `model_init_kwargs` (dtype bf16,
attention implementation, one device); `peft_config` is the shared LoRA config (r=4, alpha=8,
dropout 0.05, seven projections). TRL itself casts the LoRA weights to bf16 for a quantized base,
turns on input gradients under checkpointing and computes the loss with its chunked "fused LM head"
(no full logits); it does *not* call `prepare_model_for_kbit_training` (no fp32 upcast).
The data are pre-tokenized: a dataset with an `input_ids` column is taken as processed (no
re-tokenization); with `completion_only_loss=True` TRL turns the `completion_mask` column into
`labels` (-100 on the prompt). Note that `completion_only_loss=None` (the default) would train on
the whole sequence here, because the default only masks datasets with `prompt`/`completion` text.

Modes. `padding`: per-device batch 8, accumulation 8 (64 examples per optimizer step), padding to
the longest in the batch. `packing`: `packing=True, packing_strategy="bfd"` (best-fit decreasing,
no example split) into `--pack_length`-token rows; TRL then switches to padding-free batches
(one flattened row, `position_ids` restart per example, no attention mask), which needs an
attention kernel that honours document boundaries: flash_attention_2 when installed, otherwise
flex_attention (sdpa would build a dense block-diagonal mask and take a slow path). Default 1 row x
accumulation 4, about 16.3k real tokens per optimizer step (the 64-example step holds ~17.5k).
`padding_free`: no packing, `padding_free=True`: each micro-batch of 8 examples is flattened into
one row (same kernels as packing), accumulation 8, `max_length=None` (TRL refuses padding-free
with a max_length unless packing; the data are already truncated).
Optimizer paged AdamW 8-bit, lr 2e-4, warmup 1 step, bf16; gradient checkpointing on unless
--no_gc (TRL's default is on); --liger sets `use_liger_kernel=True` (TRL 1.16 applies Liger's
RMSNorm/SwiGLU/RoPE kernels only: it forbids Liger's fused linear cross-entropy because it already
patches the LM head with its own chunked loss).

Prints one JSON line (see common.result_line) as the last line of stdout.
"""

from __future__ import annotations

import importlib.util

from bench import common
from bench import data as bench_data


def parse_args(argv=None):
    p = common.baseline_parser(__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["padding", "packing", "padding_free"], default="padding")
    p.add_argument("--pack_length", type=int, default=4096, help="row length when packing")
    p.add_argument("--batch", type=int, default=None, help="per-device batch (padding 8, packing 1 row)")
    p.add_argument("--accum", type=int, default=None, help="grad accumulation (padding 8, packing 4)")
    p.add_argument("--liger", action="store_true", help="use_liger_kernel=True")
    p.add_argument("--no_gc", action="store_true", help="gradient_checkpointing=False")
    p.add_argument(
        "--attn",
        default="auto",
        help="attn_implementation (auto: sdpa; packing: flash_attention_2 "
        "if installed, else flex_attention; sdpa on CPU)",
    )
    p.add_argument("--variant", default=None, help="default: <mode>[+liger][+gc|-gc]")
    p.add_argument("--output_dir", default="/tmp/qlora_bench/trl_out")
    return p.parse_args(argv)


def pick_attn(a) -> str:
    if a.attn != "auto":
        return a.attn
    if a.mode == "padding" or a.device == "cpu":  # FlexAttention has no CPU backward
        return "sdpa"
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "flex_attention"


def main(argv=None):
    a = parse_args(argv)
    packing = a.mode == "packing"
    flat = a.mode != "padding"  # padding-free batches (packing implies it with bfd)
    batch = a.batch or (1 if packing else 8)
    accum = a.accum or (4 if packing else 8)
    gc = not a.no_gc
    attn = pick_attn(a)
    variant = a.variant or f"{a.mode}{'+liger' if a.liger else ''}{'+gc' if gc else '-gc'}"
    model_dir, data_dir = common.prepare_model_and_data(a)

    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    on_gpu = a.device == "cuda"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ds = bench_data.load(data_dir).select_columns(["input_ids", "completion_mask"])

    cfg = SFTConfig(
        output_dir=a.output_dir,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        max_steps=a.max_steps,
        learning_rate=2e-4,
        warmup_steps=1,
        optim="paged_adamw_8bit",
        bf16=on_gpu,
        use_cpu=not on_gpu,
        gradient_checkpointing=gc,
        max_length=a.pack_length if packing else (None if flat else a.max_length),
        packing=packing,
        packing_strategy="bfd",
        padding_free=flat,  # implied by packing + bfd in TRL 1.16; explicit for the record
        completion_only_loss=True,
        use_liger_kernel=a.liger,
        model_init_kwargs={
            "dtype": "bfloat16" if on_gpu else "float32",
            "attn_implementation": attn,
            "device_map": common.device_map(a.device),
        },
        save_strategy="no",
        report_to="none",
        seed=42,
    )
    counter = common.CountingCollator(None)
    timer = common.make_timing_callback(counter, a.warmup_steps, a.device, a.max_seconds)
    trainer = SFTTrainer(
        model=model_dir,
        args=cfg,
        train_dataset=ds,
        processing_class=tokenizer,
        quantization_config=common.nf4_config(),
        peft_config=common.lora_config(),
        callbacks=[timer],
    )
    counter.inner = trainer.data_collator
    trainer.data_collator = counter
    trainer.model.print_trainable_parameters()
    train_rows = len(trainer.train_dataset)
    out = trainer.train()

    settings = {
        "trainer": "trl.SFTTrainer",
        "mode": a.mode,
        "per_device_batch": batch,
        "grad_accum": accum,
        "packing": packing,
        "packing_strategy": "bfd" if packing else None,
        "pack_length": a.pack_length if packing else None,
        "padding_free": bool(trainer.padding_free),
        "train_rows_after_prep": train_rows,
        "max_steps": a.max_steps,
        "max_seconds": a.max_seconds,
        "warmup_steps_skipped": a.warmup_steps,
        "labels": "completion_mask -> labels (prompt -100), completion_only_loss=True",
        "gradient_checkpointing": gc,
        "use_liger_kernel": a.liger,
        "attn_implementation": attn,
        "model_dtype": ("bfloat16" if on_gpu else "float32")
        + " (TRL model_init_kwargs); TRL casts LoRA weights to bf16",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.05, "targets": common.LORA_TARGETS},
        "quant": "nf4, double quant, bf16 compute",
        "optim": "paged_adamw_8bit",
        "bf16": on_gpu,
        "lr": 2e-4,
        "data": {**bench_data.meta(data_dir), "path": data_dir},
        "model_dir": model_dir,
        "peak_mem_window": "from train start (weights already loaded)",
    }
    common.emit_trainer_run("trl", variant, a, timer, settings, out)


if __name__ == "__main__":
    main()

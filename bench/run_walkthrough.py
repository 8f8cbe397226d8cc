"""Baseline 1: the walkthrough's QLoRA pipeline, reproduced faithfully, timed.

Run (GPU; builds the model folder and the data on first use, reuses them after):

    python -m bench.run_walkthrough --shape llama-3.1-8b --max_length 512 --max_steps 22 --out results.jsonl

CPU smoke test (tiny shape, 4 optimizer steps of 2 x 2 examples):

    python -m bench.run_walkthrough --shape tiny --device cpu --max_length 128 --n_examples 64 \
        --max_steps 4 --accum 2

What is reproduced from shared/seed/qlora-koalpaca-walkthrough.md: transformers `Trainer` (the
walkthrough passes its own collator, so SFTTrainer adds nothing but dataset handling), bitsandbytes
NF4 with double quantization and bf16 compute, `prepare_model_for_kbit_training(model)` with its
defaults (all non-4-bit weights upcast to fp32, gradient checkpointing on), LoRA r=4 alpha=8
dropout 0.05 on the seven projections, its collate function (pad to the longest in the batch,
`labels = input_ids`, i.e. the loss also trains on padding: the walkthrough's bug, kept on purpose),
per-device batch 2, paged AdamW 8-bit, bf16, lr 2e-4, warmup 1 step, `use_cache=False`.
Deviations, all recorded in the JSON `settings`: gradient accumulation 32 instead of 4 (issue 7's
common effective batch of 64 examples); the pad token is set to EOS (Llama 3 ships none, and
`tokenizer.pad` refuses to pad without one: every user of the walkthrough has to do this);
`device_map={"": 0}` instead of "auto" (same thing on one GPU); no checkpoint saving; the data
are pre-tokenized synthetic ids (bench/data.py), passed as the walkthrough's
`input_ids`/`attention_mask` columns.

Prints one JSON line (see common.result_line) as the last line of stdout.
"""

from __future__ import annotations

from bench import common
from bench import data as bench_data


def parse_args(argv=None):
    p = common.baseline_parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2, help="per-device batch (walkthrough: 2)")
    p.add_argument("--accum", type=int, default=32, help="gradient accumulation (2 x 32 = 64 examples)")
    p.add_argument("--variant", default="faithful")
    p.add_argument("--output_dir", default="/tmp/qlora_bench/walkthrough_out")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    model_dir, data_dir = common.prepare_model_and_data(a)

    import transformers
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.eos_token  # Llama 3 has no pad token; tokenizer.pad needs one

    # Walkthrough step "tokenize": its dataset holds the tokenizer's input_ids + attention_mask.
    ds = bench_data.load(data_dir)
    ds = ds.map(lambda ex: {"attention_mask": [1] * len(ex["input_ids"])}).select_columns(
        ["input_ids", "attention_mask"]
    )

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=common.nf4_config(), device_map=common.device_map(a.device)
    )
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, common.lora_config())
    model.print_trainable_parameters()

    def collate_fn(examples):  # the walkthrough's collator, verbatim
        examples_batch = tokenizer.pad(examples, padding="longest", return_tensors="pt")
        examples_batch["labels"] = examples_batch["input_ids"]
        return examples_batch

    counter = common.CountingCollator(collate_fn)
    timer = common.make_timing_callback(counter, a.warmup_steps, a.device, a.max_seconds)
    on_gpu = a.device == "cuda"
    train_args = transformers.TrainingArguments(
        per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=a.accum,
        warmup_steps=1,
        max_steps=a.max_steps,
        learning_rate=2e-4,
        bf16=on_gpu,
        use_cpu=not on_gpu,
        output_dir=a.output_dir,
        optim="paged_adamw_8bit",
        logging_steps=50,
        save_total_limit=3,
        save_strategy="no",
        report_to="none",
        seed=42,
    )
    trainer = Trainer(model=model, train_dataset=ds, args=train_args, data_collator=counter, callbacks=[timer])
    model.config.use_cache = False
    out = trainer.train()

    settings = {
        "trainer": "transformers.Trainer",
        "per_device_batch": a.batch,
        "grad_accum": a.accum,
        "effective_batch_examples": a.batch * a.accum,
        "max_steps": a.max_steps,
        "max_seconds": a.max_seconds,
        "warmup_steps_skipped": a.warmup_steps,
        "padding": "longest",
        "labels": "input_ids (pads unmasked, prompt unmasked: walkthrough bug kept)",
        "pad_token": "eos",
        "kbit_prep": "prepare_model_for_kbit_training defaults (fp32 upcast, checkpointing)",
        "gradient_checkpointing": bool(getattr(model.base_model.model, "is_gradient_checkpointing", True)),
        "lora": {"r": 4, "alpha": 8, "dropout": 0.05, "targets": common.LORA_TARGETS},
        "quant": "nf4, double quant, bf16 compute",
        "optim": "paged_adamw_8bit",
        "bf16": on_gpu,
        "lr": 2e-4,
        "attn_implementation": model.config._attn_implementation,
        "data": {**bench_data.meta(data_dir), "path": data_dir},
        "model_dir": model_dir,
        "peak_mem_window": "from train start (weights already loaded)",
    }
    common.emit_trainer_run("walkthrough", a.variant, a, timer, settings, out)


if __name__ == "__main__":
    main()

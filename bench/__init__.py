"""The benchmark: qlora_lit against the walkthrough's pipeline and TRL, and tools that price one lever each.

Every tool is a module, run from the repository root as `python -m bench.<tool> ...` (docs/PERFORMANCE.md has the
recorded commands; bench/run_baselines.sh runs the comparison variants one process each):

    shapes, data          the random-initialised model shapes and the synthetic data every runner shares
    run_walkthrough       baseline 1: the walkthrough's HF Trainer pipeline
    run_trl               baseline 2: TRL's SFTTrainer
    run_qlora_lit         qlora_lit's own stack (QLoRAModule under a Lightning Trainer), variants of its settings
    forward_backward      the model's forward + backward alone, under several execution settings (no optimizer)
    step_trace            StepProfiler: a torch.profiler trace of one optimizer step of a Lightning run
    optimizer_step        bitsandbytes' 8-bit AdamW step against qlora_lit's
    scaling               `python -m qlora_lit fit` on 1, 2, 4, 8 GPUs
    rank_balance          how long DDP ranks wait for the slowest each step, from the data alone (no GPU)
    prequantized          a random pre-quantized 4-bit folder of a real shape (70B without the bf16 model)
    fsdp_capped           the CLI's FSDP fit on two ranks sharing one GPU, each capped below the whole base
    fsdp_memory           FSDP-QLoRA's memory per GPU, computed from a shape, and the fewest GPUs per card size
    fsdp_units            FSDP's own cost per step with a unit per LoRA matrix or replicated adapters (CPU, gloo)
    dequantized_gpu       one NF4 layer against its kept dequantized weight on a GPU (keep_dequantized's products)
    zoo_gpu               configs/base.yaml on every architecture of tests/zoo.py
    report                the runners' JSON lines as one results file and markdown tables
    common                what the runners share, and tests/ helpers loaded by path (not run directly)
"""

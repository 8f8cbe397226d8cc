"""Where a qlora_lit micro-batch spends its time on a GPU: forward + backward throughput of the same examples under
several execution settings, and a kernel-time table from torch.profiler. No optimizer step, no Lightning: this
isolates the model's compute so each lever can be priced before it is built into the trainer.

    python -m bench.forward_backward --shape llama-3.1-8b --out profile.jsonl

Settings, measured in this order on one loaded model (each prints one JSON line):
    pad16            16 length-grouped examples per micro-batch, right-padded, with attention_mask (qlora_lit today)
    pad16-nomask     the same without attention_mask: right padding under a causal mask is never attended by a real
                     token, so sdpa can take its flash kernel
    pad16-nodropout  pad16-nomask with LoRA dropout off (prices the seven dropout copies of each layer input)
    pad16-dequant-cache  pad16-nomask with every NF4 weight dequantized once and kept (prices NF4 dequantization)
    pack4096-sdpa    packed rows of <= 4096 tokens, block-diagonal mask from position ids (sdpa)
    pack4096-varlen  the same rows through qlora_lit's `varlen` attention (torch's varlen flash kernel), no mask
    pad16-compile    pad16-nomask with each decoder layer torch.compile'd
    pad16-liger      pad16-nomask with Liger's RMSNorm, SwiGLU, RoPE and fused linear cross-entropy
"""

from __future__ import annotations

import argparse
import json
import os
import time
import types

import torch
import torch.nn.functional as F

from bench import common
from bench import data as bench_data
from qlora_lit import attention
from qlora_lit.data.collate import PaddingCollator
from qlora_lit.data.packing import PackedDataset, PackingCollator, pack_rows
from qlora_lit.data.sampler import EpochBatchSampler
from qlora_lit.model import LoraArgs, QuantizationArgs, attach_lora, load_base_model

PAD_ID = 128001


def batches(rows, n: int, max_length: int) -> dict[str, list]:
    pairs = zip(rows["input_ids"][:n], rows["completion_mask"][:n], strict=True)
    examples = [{"input_ids": ids, "trained_spans": [(mask.index(1), len(ids))]} for ids, mask in pairs]
    lengths = [len(e["input_ids"]) for e in examples]
    sampler = EpochBatchSampler(lengths, 16, seed=0, group_by_length=True)
    pad = PaddingCollator(pad_id=PAD_ID)
    padded = [pad([examples[i] for i in idx]) for idx in sampler]
    for b in padded:
        b.pop("step_label_tokens", None)
    packed_ds = PackedDataset(examples, pack_rows(lengths, 4096))
    pack = PackingCollator(pad_id=PAD_ID)
    packed = [pack([packed_ds[i]]) for i in range(len(packed_ds))]
    for b in packed:
        b.pop("step_label_tokens", None)
    return {"padded": padded, "packed": packed, "tokens": sum(lengths)}


def measure(model, micro_batches, tokens: int, drop_mask: bool = False, passes: int = 1, varlen: bool = False) -> dict:
    def run_once():
        for batch in micro_batches:
            inputs = {k: v.cuda(non_blocking=True) for k, v in batch.items() if v is not None}
            if drop_mask:
                inputs.pop("attention_mask", None)
            if varlen:  # what QLoRAModule.model_inputs adds for attn_implementation varlen
                inputs.update(attention.sequence_starts(inputs["position_ids"]))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**inputs, use_cache=False).loss
            loss.backward()
        model.zero_grad(set_to_none=True)

    run_once()  # warm-up (and compilation)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(passes):
        run_once()
    torch.cuda.synchronize()
    secs = (time.perf_counter() - t0) / passes
    return {
        "fwd_bwd_tokens_per_s": round(tokens / secs, 1),
        "secs_per_pass": round(secs, 3),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }


def profile(model, micro_batches, drop_mask: bool, rows: int = 35) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for batch in micro_batches[:3]:
            inputs = {k: v.cuda() for k, v in batch.items() if v is not None}
            if drop_mask:
                inputs.pop("attention_mask", None)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**inputs, use_cache=False).loss
            loss.backward()
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=70)


def cache_dequantized(model) -> list:
    import bitsandbytes as bnb

    patched = []
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
            m._qlit_w = weight.to(m.compute_dtype or torch.bfloat16)
            m.forward = types.MethodType(lambda self, x: F.linear(x.to(self._qlit_w.dtype), self._qlit_w, self.bias), m)
            patched.append(m)
    return patched


def uncache(patched: list) -> None:
    for m in patched:
        del m.forward
        del m._qlit_w
    torch.cuda.empty_cache()


def set_lora_dropout(model, on: bool, saved: dict) -> None:
    for name, m in model.named_modules():
        if hasattr(m, "lora_dropout") and "default" in m.lora_dropout:
            if not on:
                saved[name] = m.lora_dropout["default"]
                m.lora_dropout["default"] = torch.nn.Identity()
            elif name in saved:
                m.lora_dropout["default"] = saved[name]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3.1-8b")
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--n_examples", type=int, default=256)
    p.add_argument("--settings", default="all", help="comma-separated names from the list above, or all")
    p.add_argument("--profile", action="store_true", help="print the kernel table of pad16 and the best setting")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    wanted = None if a.settings == "all" else set(a.settings.split(","))
    rows = bench_data.load(os.path.join(common.CACHE, "data", f"n4096-l{a.max_length}"))
    data = batches(rows, a.n_examples, a.max_length)
    base = load_base_model(os.path.join(common.CACHE, "models", a.shape), QuantizationArgs(), "cuda")
    lora = LoraArgs(r=4, alpha=8, dropout=0.05, target_modules=list(common.LORA_TARGETS))
    model = attach_lora(base, lora, gradient_checkpointing=False, upcast_to_fp32=False)
    versions = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}

    def record(name: str, result: dict) -> None:
        line = {"setting": name, "shape": a.shape, "max_length": a.max_length, **result, **versions}
        print(json.dumps(line), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(line) + "\n")

    def attempt(name: str, fn) -> None:
        if wanted is not None and name not in wanted:
            return
        try:
            record(name, fn())
        except Exception as err:  # a lever that does not run here is a result too
            record(name, {"error": f"{type(err).__name__}: {err}"[:500]})
            torch.cuda.empty_cache()

    padded, packed, tokens = data["padded"], data["packed"], data["tokens"]
    attempt("pad16", lambda: measure(model, padded, tokens))
    if a.profile:
        print(profile(model, padded, drop_mask=False), flush=True)
    attempt("pad16-nomask", lambda: measure(model, padded, tokens, drop_mask=True))
    saved: dict = {}
    set_lora_dropout(model, False, saved)
    attempt("pad16-nodropout", lambda: measure(model, padded, tokens, drop_mask=True))
    set_lora_dropout(model, True, saved)

    def dequant_cache():
        patched = cache_dequantized(model)
        try:
            return measure(model, padded, tokens, drop_mask=True)
        finally:
            uncache(patched)

    attempt("pad16-dequant-cache", dequant_cache)
    attempt("pack4096-sdpa", lambda: measure(model, packed, tokens))

    def varlen():
        model.base_model.model.set_attn_implementation(attention.NAME)
        try:
            return measure(model, packed, tokens, varlen=True)
        finally:
            model.base_model.model.set_attn_implementation("sdpa")

    attempt("pack4096-varlen", varlen)

    def compiled():
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = 64
        layers = model.base_model.model.model.layers
        for layer in layers:
            layer.compile(dynamic=True)
        try:
            t0 = time.perf_counter()
            result = measure(model, padded, tokens, drop_mask=True)
            return {**result, "warmup_and_compile_s": round(time.perf_counter() - t0, 1)}
        finally:
            for layer in layers:
                layer._compiled_call_impl = None

    attempt("pad16-compile", compiled)

    def liger():
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(
            rope=True,
            rms_norm=True,
            swiglu=True,
            cross_entropy=False,
            fused_linear_cross_entropy=True,
            model=model.base_model.model,
        )
        return measure(model, padded, tokens, drop_mask=True)

    attempt("pad16-liger", liger)  # last: Liger patches in place
    if a.profile:
        print(profile(model, padded, drop_mask=True), flush=True)


if __name__ == "__main__":
    main()

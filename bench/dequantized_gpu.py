"""Does keeping the dequantized weights (`model.keep_dequantized`) compute what bitsandbytes' 4-bit layer computes,
on this GPU? One NF4 layer of the 8B shape (4096 -> 14336, double quantization, bf16), against its weight dequantized
once and used through `F.linear`, for micro-batches on both sides of bitsandbytes' 1,536-token switch to its own
fused kernel (`_gemm_4bit_use_custom_cuda`, per GPU generation and shape).

    python -m bench.dequantized_gpu [--out rows.jsonl]

One JSON line per token count: whether the outputs and the input gradients are bit-identical, and the largest
difference relative to the output's largest value.
"""

from __future__ import annotations

import argparse

import bitsandbytes as bnb
import torch
import torch.nn.functional as F

from bench import common


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 256, 1024, 1536, 1537, 2048, 4096])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(4096, 14336, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(14336, 4096) * 0.02, requires_grad=False, quant_type="nf4")
    layer = layer.to(a.device)
    kept = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
    for tokens in a.tokens:
        x = torch.randn(tokens, 4096, device=a.device, dtype=torch.bfloat16, requires_grad=True)
        out = layer(x)
        (grad,) = torch.autograd.grad(out.float().square().sum(), x)
        y = x.detach().requires_grad_(True)
        reference = F.linear(y, kept)
        (grad_ref,) = torch.autograd.grad(reference.float().square().sum(), y)
        scale = reference.abs().max().item()
        row = {
            "tokens": tokens,
            "device": torch.cuda.get_device_name() if a.device == "cuda" else a.device,
            "output_equal": torch.equal(out, reference),
            "output_max_diff_rel": (out.float() - reference.float()).abs().max().item() / scale,
            "input_grad_equal": torch.equal(grad, grad_ref),
            "versions": {"torch": torch.__version__, "bitsandbytes": bnb.__version__},
        }
        common.emit(row, a.out)


if __name__ == "__main__":
    main()

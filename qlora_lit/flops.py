"""Model FLOPs of LoRA training on a frozen base, and the accelerators' peak, for MFU.

For a sequence of L real (non-padding) tokens:

    flops(L) = L * (4 * N_frozen + 6 * N_trained) + 6 * layers * width * L * (L + 1)

- N_frozen: weights of the frozen base's matrix products (linear layers incl. the output head, not the embedding
  lookup), at their logical sizes: a 4-bit layer counts in_features x out_features, not its packed storage; a
  mixture of experts' fused expert tensors at the share of experts a token is routed to, and its router. A vision
  tower beside the language model (Gemma 3 4B+) is not counted: text training never runs it.
  Each costs 2 FLOPs per token forward and 2 backward for the input gradient; a frozen weight needs no weight
  gradient (full fine-tuning would add those 2: the usual 6N).
- N_trained: the LoRA matrices: forward, input gradient and weight gradient, 6 FLOPs per weight per token.
- Attention: query position i attends to i keys (causal), QK^T and AV cost 2 * i * width each forward, and their
  backward twice that, so 12 * i * width per layer; summed over i = 1..L: 6 * width * L * (L + 1) per layer.
  `width` is query heads x head size. (PaLM's 12 * layers * width * L per token counts the masked half too.)
  Sliding-window layers (Mistral, Gemma 2/3, EXAONE 4) are counted as full causal attention: for sequences longer
  than the window this overstates their attention work (Gemma 3 4B at 4096 tokens: MFU about 4% high).

Activation recomputation (gradient checkpointing) and padding are not useful work and are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qlora_lit.model import causal_lm, language_model_modules

# Dense (no sparsity) bf16 tensor-core peak per device in TFLOP/s, from the vendors' data sheets. The first entry
# whose key is in torch.cuda.get_device_name() wins, so specific names come before general ones. Not Lightning's
# get_available_flops: it agrees on the A100 and H100, but has no H200, GH200 or B200 (its H200 names carry sparse
# figures), reads an L40S as an L4 and gives the H100 NVL's sparse figure (tests/test_library_assumptions.py).
PEAK_BF16_TFLOPS: dict[str, float] = {
    "B200": 2250.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM
    "GH200": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
}


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a device named like `torch.cuda.get_device_name()`, or None if unknown."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in device_name), None)


def matmul_weights(model: torch.nn.Module) -> tuple[int, int]:
    """Weights of the matrix products a token goes through, (frozen, trained), at logical sizes: the linear layers
    (bitsandbytes layers subclass nn.Linear), a mixture of experts' fused expert tensors (experts x out x in) at the
    share of experts each token is routed to, and its router. Only the language model and its head count: a vision
    tower beside them (Gemma 3 4B+) never runs in text training."""
    language = language_model_modules(causal_lm(model))
    text = causal_lm(model).config.get_text_config()
    routed = getattr(text, "num_experts_per_tok", None)
    frozen = trained = 0
    for name, module in model.named_modules():
        # peft keeps the untouched original of a `modules_to_save` layer beside its trained copy; only the copy runs.
        if ".original_module" in name or (language is not None and module not in language):
            continue
        sizes = []
        if isinstance(module, torch.nn.Linear):
            sizes = [(module.in_features * module.out_features, module.weight.requires_grad)]
        elif not isinstance(module, torch.nn.Embedding):
            for param in module.parameters(recurse=False):
                if param.dim() == 3:  # fused experts: each token runs `routed` of them
                    share = min(routed, param.shape[0]) / param.shape[0] if routed else 1.0
                    sizes.append((int(param.numel() * share), param.requires_grad))
                elif param.dim() == 2 and type(module).__name__.endswith("Router"):
                    sizes.append((param.numel(), param.requires_grad))
        for size, requires_grad in sizes:
            if requires_grad:
                trained += size
            else:
                frozen += size
    return frozen, trained


@dataclass(frozen=True)
class LoraFlops:
    """The terms of the formula in this module's docstring, for one model."""

    frozen_weights: int
    trained_weights: int
    layers: int
    attention_width: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> LoraFlops:
        """Read the terms from a (peft, quantized) Hugging Face causal LM."""
        config = model.config.get_text_config()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        frozen, trained = matmul_weights(model)
        return cls(frozen, trained, config.num_hidden_layers, config.num_attention_heads * head_dim)

    def total(self, tokens: float, causal_pairs: float) -> float:
        """FLOPs of sequences with `tokens` real tokens in all and sum(L * (L + 1) / 2) = `causal_pairs`."""
        per_token = 4 * self.frozen_weights + 6 * self.trained_weights
        return tokens * per_token + 12 * self.layers * self.attention_width * causal_pairs

    def per_sequence(self, length: int) -> float:
        return self.total(length, length * (length + 1) / 2)

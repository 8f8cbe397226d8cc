"""qlora_lit: QLoRA fine-tuning of Hugging Face causal LMs on Korean instruction data with PyTorch Lightning."""

from qlora_lit.quiet import silence

__version__ = "0.1.0"

silence()

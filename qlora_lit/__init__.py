"""qlora_lit: QLoRA fine-tuning of Hugging Face causal LMs on Korean instruction data with PyTorch Lightning."""

__version__ = "0.1.0"

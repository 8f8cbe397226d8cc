"""qlora_lit: QLoRA fine-tuning of Hugging Face causal LMs on Korean instruction data with PyTorch Lightning."""

import logging

__version__ = "0.1.0"

# On CPUs with AVX512-BF16, importing bitsandbytes tries to fetch a hub kernel for its CPU inference layout and warns
# when it cannot. qlora_lit never computes in that layout (model.keep_training_layout), so the warning is only noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "gemm_4bit_forward" not in record.msg)

"""Library messages a qlora_lit user cannot act on, silenced in one place (imported with the package).

What stays: the data summary, the attention and checkpointing choices, the first step's time, progress, and every
warning not listed here.
"""

from __future__ import annotations

import logging
import warnings

# Lightning's log lines (INFO) that advertise or advise what qlora_lit has already decided.
LIGHTNING_INFO = (
    "litlogger",  # an advertisement for a cloud logger
    "set `torch.set_float32_matmul_precision",  # matrix products run in bf16/fp16 under mixed precision anyway
)
WARNINGS = (
    # Each pass of the sampler starts where training stands (the batches trained, which Lightning restores).
    "You're resuming from a checkpoint that ended before the epoch ended",
    # The module's on_before_batch_transfer is meant (the data module has none).
    "You have overridden `on_before_batch_transfer` in `LightningModule`",
    # The examples are tokenized once and cached; collating a batch takes microseconds, so workers only add startup.
    "does not have many workers which may be a bottleneck",
    # The summary's size estimate: bf16-mixed keeps the trained weights in fp32, the frozen ones are 4-bit.
    "is not supported by the model summary",
    # Library calls of APIs their own next versions renamed (Lightning 2.6 of torch's, peft 0.21 of transformers'):
    # nothing for a user to change.
    "isinstance(treespec, LeafSpec)",
    "`is_gradient_checkpointing` is deprecated",
    "`gradient_checkpointing_enable` is deprecated",
)


def _lightning_info(record: logging.LogRecord) -> bool:
    return not any(text in str(record.msg) for text in LIGHTNING_INFO)


def silence() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_lightning_info)
    for text in WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{text}".replace("(", r"\(").replace(")", r"\)"))
    # On CPUs with AVX512-BF16, importing bitsandbytes tries to fetch a hub kernel for its CPU inference layout and
    # warns when it cannot. qlora_lit never computes in that layout (model.keep_training_layout).
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "gemm_4bit_forward" not in record.msg)

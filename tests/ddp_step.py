"""One optimizer step on `--devices` CPU processes (DDP over gloo); rank 0 saves the all-reduced LoRA gradients.

python tests/ddp_step.py --devices 2 --batch_size 2 --out grads.pt
"""

from __future__ import annotations

import argparse
import os
import sys

import lightning as L
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import SAMPLE_DATA, TINY_MODEL  # noqa: E402
from test_loss_normalisation import GradientCapture  # noqa: E402

from qlora_lit.data import KoAlpacaDataModule  # noqa: E402
from qlora_lit.model import LoraArgs, QuantizationArgs  # noqa: E402
from qlora_lit.module import QLoRAModule  # noqa: E402
from qlora_lit.optim import OptimizerArgs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--batch_size", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    L.seed_everything(11)
    module = QLoRAModule(
        TINY_MODEL,
        quantization=QuantizationArgs(compute_dtype="float32"),
        lora=LoraArgs(r=4, alpha=8, dropout=0.0),
        optimizer=OptimizerArgs(name="adamw"),
    )
    data = KoAlpacaDataModule(SAMPLE_DATA, TINY_MODEL, max_length=256, batch_size=args.batch_size, val_size=8, seed=5)
    capture = GradientCapture()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        use_distributed_sampler=False,
        callbacks=[capture],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, data)
    if trainer.is_global_zero:
        torch.save(capture.grads, args.out)


if __name__ == "__main__":
    main()

"""One optimizer step on `--devices` CPU processes (DDP over gloo); rank 0 saves the all-reduced LoRA gradients.

python tests/ddp_step.py --devices 2 --batch_size 2 --out grads.pt
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_loss_normalisation import first_step_gradients  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--batch_size", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    grads = first_step_gradients(args.batch_size, accumulate=1, devices=args.devices)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        torch.save(grads, args.out)


if __name__ == "__main__":
    main()

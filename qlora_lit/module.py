"""The LightningModule: trains LoRA adapters on a 4-bit base and checkpoints only what it trains."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from peft import PeftModel

from qlora_lit.errors import ConfigError
from qlora_lit.model import (
    AttnImplementation,
    LoraArgs,
    QuantizationArgs,
    attach_lora,
    check_attn_implementation,
    load_base_model,
)
from qlora_lit.optim import OptimizerArgs, build_optimizer, build_scheduler


class QLoRAModule(L.LightningModule):
    """QLoRA fine-tuning of a Hugging Face causal LM.

    Args:
        model_name_or_path: hub id, local folder, or `builtin:tiny-llama`.
        quantization: how the frozen base is stored (4-bit NF4 with double quantization by default).
        lora: the trained low-rank adapters.
        optimizer: optimizer and learning-rate schedule.
        gradient_checkpointing: recompute activations in backward to save memory (non-reentrant).
        upcast_to_fp32: cast norms, embeddings and the output head to fp32 (peft's k-bit preparation).
        trust_remote_code: run modeling code shipped with the model repository. Only for models you trust.
        attn_implementation: attention kernel: sdpa (default, everywhere), eager, or on a GPU flash_attention_2 (needs
            the flash-attn package) or flex_attention, the fast ones for packed rows (data.pack_length).
    """

    def __init__(
        self,
        model_name_or_path: str = "builtin:tiny-llama",
        quantization: QuantizationArgs = QuantizationArgs(),  # noqa: B008 - frozen-by-convention settings
        lora: LoraArgs = LoraArgs(),  # noqa: B008
        optimizer: OptimizerArgs = OptimizerArgs(),  # noqa: B008
        gradient_checkpointing: bool = True,
        upcast_to_fp32: bool = True,
        trust_remote_code: bool = False,
        attn_implementation: AttnImplementation = "sdpa",
    ) -> None:
        super().__init__()
        check_attn_implementation(attn_implementation)
        # Plain dicts, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "model_name_or_path": model_name_or_path,
                "quantization": asdict(quantization),
                "lora": asdict(lora),
                "optimizer": asdict(optimizer),
                "gradient_checkpointing": gradient_checkpointing,
                "upcast_to_fp32": upcast_to_fp32,
                "trust_remote_code": trust_remote_code,
                "attn_implementation": attn_implementation,
            }
        )
        self.model_name_or_path = model_name_or_path
        self.quantization = quantization
        self.lora = lora
        self.optimizer_args = optimizer
        self.gradient_checkpointing = gradient_checkpointing
        self.upcast_to_fp32 = upcast_to_fp32
        self.trust_remote_code = trust_remote_code
        self.attn_implementation = attn_implementation
        self.model: PeftModel | None = None
        self.strict_loading = False  # checkpoints hold the adapters only; on_load_checkpoint checks them
        self._val_loss_sum = torch.zeros(())
        self._val_tokens = torch.zeros(())

    def configure_model(self) -> None:
        """Load the base on this process's device and attach LoRA (Lightning calls this once the device is set)."""
        if self.model is not None:
            return
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        if self.quantization.enabled and precision in ("bf16-true", "16-true", "64-true"):
            raise ConfigError(
                f"trainer.precision={precision} casts the whole model, which 4/8-bit weights cannot take; "
                "use bf16-mixed or 32-true (the 4-bit layers compute in quantization.compute_dtype either way)"
            )
        base = load_base_model(
            self.model_name_or_path, self.quantization, device, self.trust_remote_code, self.attn_implementation
        )
        self.model = attach_lora(base, self.lora, self.gradient_checkpointing, self.upcast_to_fp32)
        trainable, total = self.model.get_nb_trainable_parameters()
        rank_zero_info(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **loss_kwargs: Any,
    ):
        """Padded batches come with `attention_mask`; packed ones with `position_ids` restarting per example instead.

        No KV cache in training: with one, transformers would not derive the packed (block-diagonal) mask.
        """
        if position_ids is not None and "flash" in self.attn_implementation:
            # flash-attention's varlen path reads sequence starts from position ids only in a single flat row
            input_ids, labels, position_ids = (
                t if t is None else t.reshape(1, -1) for t in (input_ids, labels, position_ids)
            )
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            position_ids=position_ids,
            use_cache=False,
            **loss_kwargs,
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Loss per label token of the whole optimizer step, over all ranks and accumulated micro-batches.

        A mean per micro-batch (HF's default) weighs a token in a short batch more than one in a long batch, and DDP
        averaging weighs ranks equally whatever their token counts. Here the sampler tells each batch how many label
        tokens its optimizer step has (`step_label_tokens`); the summed loss over that count, times the world size and
        accumulation that DDP and Lightning divide by, gives exactly the gradient of one big batch.
        """
        step_tokens = batch.pop("step_label_tokens", None)
        if step_tokens is None:
            loss = self(**batch).loss
            self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
            return loss
        loss_sum = self(**batch, num_items_in_batch=step_tokens).loss * step_tokens
        label_tokens = (batch["labels"][:, 1:] != -100).sum()
        self.log("train_loss", loss_sum.detach() / label_tokens.clamp(min=1), prog_bar=True, batch_size=1)
        return loss_sum / step_tokens * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self(**batch).loss
        label_tokens = (batch["labels"][:, 1:] != -100).sum()  # the model shifts labels by one
        self._val_loss_sum += loss.detach().float().cpu() * label_tokens.cpu()
        self._val_tokens += label_tokens.cpu()

    def on_validation_epoch_end(self) -> None:
        """Validation loss per label token over the whole set (not a mean of batch means), and its perplexity."""
        totals = self.all_gather(torch.stack([self._val_loss_sum, self._val_tokens]).to(self.device))
        loss_sum, tokens = totals.reshape(-1, 2).sum(0)
        val_loss = loss_sum / tokens.clamp(min=1)
        self.log("val_loss", val_loss, prog_bar=True, rank_zero_only=True)
        self.log("val_ppl", torch.exp(val_loss), rank_zero_only=True)
        self._val_loss_sum.zero_()
        self._val_tokens.zero_()

    def configure_optimizers(self) -> dict[str, Any]:
        trainable = [p for p in self.parameters() if p.requires_grad]
        optimizer = build_optimizer(trainable, self.optimizer_args)
        scheduler = build_scheduler(optimizer, self.optimizer_args, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def trainable_keys(self) -> set[str]:
        return {name for name, param in self.named_parameters() if param.requires_grad}

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Only the trained tensors: the frozen (4-bit) base stays out of checkpoints."""
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        keep = {prefix + key for key in self.trainable_keys()}
        return type(full)((key, value) for key, value in full.items() if key in keep)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The random stream (LoRA dropout) goes along, so a resumed run continues exactly as an uninterrupted one.
        # Torch generators only (tensors), so the checkpoint still loads with weights_only=True.
        checkpoint["torch_rng"] = {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """With strict loading off, check ourselves that every trained tensor is in the checkpoint, shape for shape."""
        if "torch_rng" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng"]["cpu"])
            if checkpoint["torch_rng"]["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(checkpoint["torch_rng"]["cuda"])
        saved = checkpoint["state_dict"]
        params = dict(self.named_parameters())
        missing = sorted(self.trainable_keys() - saved.keys())
        wrong_shape = [key for key in self.trainable_keys() & saved.keys() if saved[key].shape != params[key].shape]
        unexpected = sorted(saved.keys() - params.keys())
        if missing or wrong_shape or unexpected:
            raise ConfigError(
                "the checkpoint does not match this model's adapters (another model or LoRA setting?): "
                f"{len(missing)} missing, e.g. {missing[:3]}; {len(wrong_shape)} of another shape, e.g. "
                f"{wrong_shape[:3]}; {len(unexpected)} unknown, e.g. {unexpected[:3]}"
            )

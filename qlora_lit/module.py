"""The LightningModule: trains LoRA adapters on a 4-bit base and checkpoints only what it trains."""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from peft import PeftModel

from qlora_lit import attention, dequantized
from qlora_lit.checkpoint_state import (
    RANDOM_STREAMS_KEY,
    all_random_streams,
    check_adapter_tensors,
    check_resume,
    restore_random_streams,
    trained_names,
    trained_tensors,
)
from qlora_lit.decoding import GenerationArgs, generate_texts
from qlora_lit.dtypes import to_dtype
from qlora_lit.errors import ConfigError, TrainingError
from qlora_lit.fsdp import (
    QLoRAFSDPStrategy,
    check_fsdp_strategy,
    check_predict_strategy,
    clip_sharded_grad_norm,
)
from qlora_lit.loss import IGNORE_INDEX, label_positions, labelled_lm_loss_sum
from qlora_lit.memory import MicroBatch, activation_bytes, fits_dequantized, needs_checkpointing
from qlora_lit.model import (
    AttnImplementation,
    LoraArgs,
    QuantizationArgs,
    attach_lora,
    check_attn_implementation,
    check_trained_biases,
    compile_decoder_layers,
    count_lora_parameters,
    load_base_model,
)
from qlora_lit.optim import OptimizerArgs, apply_optimizer_settings, build_optimizer, build_scheduler
from qlora_lit.plain_head import supports_labelled_loss
from qlora_lit.preflight import (
    check_gpu_generation,
    check_packing,
    check_precision,
    check_vocabulary,
    choose_attention,
    describe_experts,
    model_config,
)


def checkpointed_settings(arguments: dict[str, Any]) -> dict[str, Any]:
    """QLoRAModule's arguments as its checkpoints keep them (`hparams`): plain containers, the settings dataclasses as
    dicts, so a checkpoint loads with torch.load(weights_only=True). `generation` stays out: LightningCLI lays a
    checkpoint's hparams over the command line, which would pin `predict --ckpt_path` to training's decoding."""
    left_out = ("self", "__class__", "generation")
    return {
        key: asdict(value) if is_dataclass(value) else value for key, value in arguments.items() if key not in left_out
    }


class QLoRAModule(L.LightningModule):
    """QLoRA fine-tuning of a Hugging Face causal LM.

    Args:
        model_name_or_path: hub id, local folder, or `builtin:tiny-llama`.
        quantization: how the frozen base is stored (4-bit NF4 with double quantization by default).
        lora: the trained low-rank adapters.
        optimizer: optimizer and learning-rate schedule.
        gradient_checkpointing: recompute activations in backward to save memory (non-reentrant); `auto` does it only
            when the kept activations of the data's largest micro-batch would not fit the GPU (qlora_lit/memory.py;
            never on a CPU).
        upcast_to_fp32: cast norms, embeddings and the output head to fp32 (peft's k-bit preparation).
        trust_remote_code: run modeling code shipped with the model repository. Only for models you trust.
        loss_chunk_tokens: logits are computed only at labelled positions (qlora_lit/loss.py); this many at a time,
            recomputed in backward (saves the largest activation with big vocabularies), or 0: all at once, kept
            (faster). Models that scale or cap their logits after the head (Gemma 2, Granite) or add a router loss
            use their own loss over all positions (qlora_lit/plain_head.py).
        generation: how `predict` decodes answers.
        attn_implementation: attention kernel: sdpa (everywhere), eager, varlen (packed rows through torch's
            variable-length flash kernel, no mask: the fast one for data.pack_length on a GPU), flash_attention_2
            (needs the flash-attn package), flex_attention, or auto: the fastest that computes this architecture
            exactly on this device (varlen on Ampere and newer GPUs, sdpa elsewhere; eager for soft-capped
            attention, Gemma 2), said at the start of the run.
        compile: torch.compile each decoder layer, fusing the element-wise work (norms, rotary embeddings,
            activation, LoRA dropout and scaling) between the matrix products. The first steps pay the compilation
            (about 2 minutes for an 8B model on an H200). GPUs only: ignored, with a message, on a CPU.
        nonfinite_loss: on a NaN or infinite training loss, `stop` with a message naming the step, before its
            update (checkpoints already written stay as they are), or `skip` the batch on every rank and go on. `stop`
            reads the losses from the device once per optimizer step; `skip` must decide before each backward, so it
            waits for each micro-batch's forward pass.
        keep_dequantized: keep the frozen 4-bit weights dequantized in the compute dtype instead of dequantizing
            them twice per micro-batch (qlora_lit/dequantized.py): the same products, faster, for the weights'
            memory in bf16. `auto` keeps them on a GPU when they fit beside the kept activations (qlora_lit/memory.py)
            and gradient checkpointing is off; never under FSDP.
    """

    def __init__(
        self,
        model_name_or_path: str = "builtin:tiny-llama",
        quantization: QuantizationArgs = QuantizationArgs(),  # noqa: B008 - frozen-by-convention settings
        lora: LoraArgs = LoraArgs(),  # noqa: B008
        optimizer: OptimizerArgs = OptimizerArgs(),  # noqa: B008
        gradient_checkpointing: bool | Literal["auto"] = True,
        upcast_to_fp32: bool = True,
        trust_remote_code: bool = False,
        loss_chunk_tokens: int = 4096,
        generation: GenerationArgs = GenerationArgs(),  # noqa: B008
        attn_implementation: AttnImplementation = "auto",
        nonfinite_loss: Literal["stop", "skip"] = "stop",
        compile: bool = False,
        keep_dequantized: bool | Literal["auto"] = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(checkpointed_settings(locals()))  # first: `locals()` holds the arguments only
        check_attn_implementation(attn_implementation)
        check_trained_biases(lora, quantization.enabled)
        if loss_chunk_tokens < 0:
            raise ConfigError(f"model.loss_chunk_tokens must be >= 0, got {loss_chunk_tokens}")
        self.model_name_or_path = model_name_or_path
        self.quantization = quantization
        self.lora = lora
        self.optimizer_args = optimizer
        self.gradient_checkpointing = gradient_checkpointing
        self.upcast_to_fp32 = upcast_to_fp32
        self.trust_remote_code = trust_remote_code
        self.loss_chunk_tokens = loss_chunk_tokens
        self.generation = generation
        self.attn_implementation = attn_implementation
        self.nonfinite_loss = nonfinite_loss
        self.compile_layers = compile  # not `self.compile`, which would hide nn.Module.compile
        self.keep_dequantized = keep_dequantized
        self.compiled_loss = False  # the cross-entropy through torch.compile: set with the compiled layers
        self.model: PeftModel | None = None
        self.strict_loading = False  # checkpoints hold the adapters only; on_load_checkpoint checks them
        self._val_totals = torch.zeros(1, 2)  # per validation loader (one per source with several): loss sum, tokens
        self._step_losses: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # this step's (batch, loss sum, labels)

    def configure_model(self) -> None:
        """Load the base on this process's device and attach LoRA (Lightning calls this once the device is set)."""
        if self.model is not None:
            return
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        strategy = self.trainer.strategy if self._trainer is not None else None
        check_fsdp_strategy(strategy, self.quantization, self.lora)
        check_precision(precision, self.quantization.enabled)
        check_gpu_generation(
            device, precision, self.quantization.compute_dtype, isinstance(strategy, QLoRAFSDPStrategy)
        )
        config = model_config(self.model_name_or_path, self.trust_remote_code)
        tokenizer = getattr(getattr(self._trainer, "datamodule", None), "tokenizer", None)
        if tokenizer is not None:
            check_vocabulary(config, tokenizer, self.model_name_or_path)
        check_packing(config, getattr(getattr(self._trainer, "datamodule", None), "pack_length", None))
        count_lora_parameters(self.model_name_or_path, self.lora, self.trust_remote_code)  # targets, on meta
        longest = getattr(getattr(self._trainer, "datamodule", None), "max_length", None)
        self.attn_implementation = choose_attention(self.attn_implementation, config, device, longest)
        sharded = isinstance(strategy, QLoRAFSDPStrategy)
        if sharded and self.upcast_to_fp32:
            raise ConfigError(
                "model.upcast_to_fp32 must be false under FSDP (configs/fsdp.yaml sets it): a unit holds one dtype"
            )
        if sharded and self.keep_dequantized is True:
            raise ConfigError(
                "model.keep_dequantized: true cannot be used under FSDP (each rank holds a shard of the 4-bit weights, "
                "not whole ones to dequantize): set it to false or auto"
            )
        args = (self.model_name_or_path, self.quantization)
        base = strategy.empty_base(*args, self.attn_implementation, self.trust_remote_code) if sharded else None
        sharded = base is not None
        if base is None:
            base = load_base_model(*args, device, self.trust_remote_code, self.attn_implementation)
        experts = describe_experts(base, config, to_dtype(self.quantization.compute_dtype))
        if experts:
            rank_zero_info(experts)
        weights = strategy.bytes_per_rank(base) if sharded else None
        checkpointing = self.checkpointing_for(base, device, weights)
        self.model = attach_lora(base, self.lora, checkpointing, self.upcast_to_fp32)
        if sharded:
            strategy.load_while_wrapping(self.model)
        elif not isinstance(strategy, QLoRAFSDPStrategy) and self.dequantize_for(self.model, device, checkpointing):
            replaced = dequantized.replace_four_bit_layers(self.model)
            rank_zero_info(f"keep_dequantized: {replaced} 4-bit layers kept dequantized in the compute dtype")
        self.compiled_loss = self.compile_layers and device.type == "cuda"
        if self.compiled_loss:
            compile_decoder_layers(self.model)
        elif self.compile_layers:  # inductor's CPU path fails on some dynamic shapes (torch 2.13), and gains little
            rank_zero_info(f"model.compile applies on GPUs only; the layers run uncompiled on {device.type}")
        trainable, total = self.model.get_nb_trainable_parameters()
        rank_zero_info(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")

    def checkpointing_for(self, base: torch.nn.Module, device: torch.device, weights: int | None = None) -> bool:
        """The `gradient_checkpointing` setting, with `auto` decided from the loaded weights (or `weights` bytes, for a
        base FSDP loads later), the GPU's memory and the largest micro-batch the data module makes."""
        if self.gradient_checkpointing != "auto":
            return bool(self.gradient_checkpointing)
        batch = self.micro_batch(base)
        if device.type != "cuda" or batch is None:
            return device.type == "cuda"  # on a GPU without data settings to judge by: the safe choice
        weights = torch.cuda.memory_allocated(device) if weights is None else weights
        total = torch.cuda.get_device_properties(device).total_memory
        chosen = needs_checkpointing(base.config, batch, self.loss_chunk_tokens, weights, total)
        estimate = (weights + activation_bytes(base.config, batch, self.loss_chunk_tokens)) / 2**30
        rank_zero_info(
            f"gradient_checkpointing auto: {'on' if chosen else 'off'} (about {estimate:.1f} GiB needed without it "
            f"for {batch.tokens} tokens per micro-batch, {total / 2**30:.1f} GiB on the GPU)"
        )
        return chosen

    def dequantize_for(self, model: torch.nn.Module, device: torch.device, checkpointing: bool) -> bool:
        """The `keep_dequantized` setting, with `auto` decided like `gradient_checkpointing`'s: on a GPU, without
        checkpointing (memory is not short), when the dequantized weights fit beside the kept activations."""
        if self.keep_dequantized != "auto":
            return bool(self.keep_dequantized)
        batch = self.micro_batch(model.get_base_model())
        if device.type != "cuda" or batch is None or checkpointing or not dequantized.four_bit_layers(model):
            return False  # on a CPU, short of memory, nothing to judge by, or no 4-bit layer (8-bit, unquantized)
        weights, extra = torch.cuda.memory_allocated(device), dequantized.extra_bytes(model)
        total = torch.cuda.get_device_properties(device).total_memory
        chosen = fits_dequantized(model.config, batch, self.loss_chunk_tokens, weights + extra, total)
        rank_zero_info(
            f"keep_dequantized auto: {'on' if chosen else 'off'} (+{extra / 2**30:.1f} GiB of dequantized weights "
            f"for {batch.tokens} tokens per micro-batch, {total / 2**30:.1f} GiB on the GPU)"
        )
        return chosen

    def micro_batch(self, causal_lm: torch.nn.Module) -> MicroBatch | None:
        """The largest micro-batch as the memory estimate sees it: its rows and their width (packed rows, or examples
        of max_length; one row when the data do not say), the attention that keeps whole score matrices (eager), and
        whether the loss takes logits at labelled positions only."""
        tokens = self.micro_batch_tokens()
        if tokens is None:
            return None
        data = self.trainer.datamodule if self._trainer is not None else None
        width = min(getattr(data, "pack_length", None) or getattr(data, "max_length", None) or tokens, tokens)
        eager = self.attn_implementation == "eager"
        return MicroBatch(tokens // width, width, eager, supports_labelled_loss(causal_lm))

    def micro_batch_tokens(self) -> int | None:
        """Tokens of the largest micro-batch: rows of `pack_length`, or examples of `max_length`, times `batch_size`."""
        data = self.trainer.datamodule if self._trainer is not None else None
        if data is None or not hasattr(data, "batch_size"):
            return None
        width = getattr(data, "pack_length", None) or getattr(data, "max_length", None)
        return width * data.batch_size if width else None

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Packed rows' sequence starts for `varlen`, and the chunked loss's labelled positions, computed while the
        batch is still on the host: on a GPU, finding them (where positions restart, the longest example, how many
        labels) makes the host wait for the GPU, once per micro-batch or more."""
        if not isinstance(batch, dict):
            return batch
        if self.attn_implementation == attention.NAME:
            batch = self.model_inputs(batch)
        if batch.get("labels") is not None and self.labelled_loss():
            labels = self.model_inputs(batch)["labels"]  # as the loss sees them: one flat row under flash-attention
            batch = {**batch, "label_positions": label_positions(labels)}
        return batch

    def labelled_loss(self) -> bool:
        return supports_labelled_loss(self.model.get_base_model())

    def model_inputs(self, batch: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
        """Padded batches come with `attention_mask`; packed ones with `position_ids` restarting per example instead.

        flash-attention's varlen path reads sequence starts from position ids only in a single flat row; `varlen`
        takes them computed once per batch.
        """
        if batch.get("position_ids") is None:
            return batch
        if self.attn_implementation == attention.NAME:
            if "cu_seq_lens_q" in batch:  # computed on the host by on_before_batch_transfer
                return batch
            return {**batch, **attention.sequence_starts(batch["position_ids"])}
        if "flash" not in self.attn_implementation:
            return batch
        flat = {"input_ids", "labels", "position_ids"}
        return {
            key: value.reshape(1, -1) if key in flat and value is not None else value for key, value in batch.items()
        }

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **loss_kwargs: Any,
    ):
        """The model's own forward and loss. No KV cache in training: with one, transformers would not derive the
        packed (block-diagonal) mask from the position ids."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        inputs.update(position_ids=position_ids, **loss_kwargs)
        return self.model(**self.model_inputs(inputs), use_cache=False)

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token loss over the labelled positions of `batch`, and how many there are."""
        causal_lm = self.model.get_base_model()
        positions = batch.pop("label_positions", None)  # found on the host (on_before_batch_transfer)
        label_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()  # the model shifts labels by one
        if self.labelled_loss():
            inputs = self.model_inputs(batch)
            loss_sum = labelled_lm_loss_sum(causal_lm, inputs, self.loss_chunk_tokens, positions, self.compiled_loss)
            return loss_sum, label_tokens
        loss = self(**batch).loss  # the model's mean: NaN for a batch without labels (a validation filler's)
        return torch.where(label_tokens > 0, loss * label_tokens, 0.0), label_tokens

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Loss per label token of the whole optimizer step, over all ranks and accumulated micro-batches.

        A mean per micro-batch (HF's default) weighs a token in a short batch more than one in a long batch, and DDP
        averaging weighs ranks equally whatever their token counts. Here the sampler tells each batch how many label
        tokens its optimizer step has (`step_label_tokens`); the summed loss over that count, times the world size and
        accumulation that DDP and Lightning divide by, gives exactly the gradient of one big batch.
        """
        step_tokens = batch.pop("step_label_tokens", None)
        loss_sum, label_tokens = self.loss_sum(batch)
        if self.nonfinite_loss == "skip" and self.nonfinite_on_any_rank([loss_sum]).any():
            where = f"global step {self.global_step}, batch {batch_idx} of epoch {self.current_epoch}"
            rank_zero_warn(f"non-finite loss at {where}: batch skipped (model.nonfinite_loss=skip)")
            return None  # Lightning skips backward and the optimizer step for this batch
        self._step_losses.append((batch_idx, loss_sum.detach(), label_tokens))  # read once per step (no wait here)
        if step_tokens is None:
            return loss_sum / label_tokens.clamp(min=1)
        return loss_sum / step_tokens * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Once per optimizer step, after its last backward and before the update: `nonfinite_loss: stop` stops if a
        micro-batch of the step had a NaN or infinite loss on any rank (nothing of it is applied), and `train_loss` is
        logged. Both are asked here rather than per micro-batch: reading a value from the GPU waits for it, and the host
        would launch each backward only once its forward had run."""
        losses, self._step_losses = self._step_losses, []
        if not losses:
            return
        if self.nonfinite_loss == "stop":
            self.stop_if_nonfinite(losses)
        self.log_step_loss(losses)

    def stop_if_nonfinite(self, losses: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        flags = self.nonfinite_on_any_rank([loss for _, loss, _ in losses])
        if not flags.any():
            return
        batch_idx, loss, _ = losses[int(flags.argmax())]  # the first micro-batch that was non-finite on some rank
        where = f"global step {self.global_step}, batch {batch_idx} of epoch {self.current_epoch}"
        what = f"is {loss.item()}" if not torch.isfinite(loss) else "is NaN or infinite on another rank"
        raise TrainingError(
            f"the training loss {what} at {where}. Resume from the last good checkpoint "
            "(--ckpt_path last) with a lower optimizer.lr or more warm-up, or set model.nonfinite_loss=skip"
        )

    def log_step_loss(self, losses: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        """`train_loss`: the loss per label token of the optimizer step, over its micro-batches and all ranks (the
        loss its gradient is of). Left on the device: Lightning reads it where it writes the logs. Not a progress-bar
        metric, which Lightning reads after every micro-batch, logs written or not (qlora_lit.progress shows it)."""
        totals = torch.stack([sum(loss for _, loss, _ in losses).float(), sum(n for _, _, n in losses).float()])
        if self.trainer.world_size > 1:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        self.log("train_loss", totals[0] / totals[1].clamp(min=1), batch_size=1)

    def nonfinite_on_any_rank(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """For each loss, 1 where it is NaN or infinite on any rank, in one reduction: all ranks must take the same
        branch, or DDP hangs (every rank runs as many micro-batches per step)."""
        flags = torch.stack([~torch.isfinite(loss.detach()) for loss in losses]).float()
        if self.trainer.world_size > 1:
            flags = self.trainer.strategy.reduce(flags, reduce_op="max")
        return flags

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        loss_sum, label_tokens = self.loss_sum(batch)
        if dataloader_idx >= len(self._val_totals):
            self._val_totals = torch.cat([self._val_totals, torch.zeros(dataloader_idx + 1 - len(self._val_totals), 2)])
        self._val_totals[dataloader_idx] += torch.stack([loss_sum.detach().float(), label_tokens.float()]).cpu()

    def on_validation_epoch_end(self) -> None:
        """Validation loss per label token over the whole set (not a mean of batch means), its perplexity, and with
        several sources (one validation loader each) each source's loss as `val_loss/<name>`."""
        per_loader = self.all_gather(self._val_totals.to(self.device)).reshape(-1, *self._val_totals.shape).sum(0)
        loss_sum, tokens = per_loader.sum(0)
        val_loss = loss_sum / tokens.clamp(min=1)
        # Logged on every rank (the values are already global): a metric that ModelCheckpoint monitors must exist on
        # all ranks, or rank 0 waits in the checkpoint barrier for ranks that skipped it.
        self.log("val_loss", val_loss, prog_bar=True, sync_dist=True)
        self.log("val_ppl", torch.exp(val_loss), sync_dist=True)
        names = list(getattr(self.trainer.datamodule, "val_by_source", None) or ())
        if len(per_loader) > 1 and len(names) == len(per_loader):
            for name, (source_sum, source_tokens) in zip(names, per_loader, strict=True):
                self.log(f"val_loss/{name}", source_sum / source_tokens.clamp(min=1), sync_dist=True)
        self._val_totals = torch.zeros(1, 2)

    def on_predict_start(self) -> None:
        check_predict_strategy(self.trainer.strategy)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, list]:
        """Answers to a batch of left-padded prompts (data.predict_path); PredictionWriter writes them."""
        data = self.trainer.datamodule  # the answers end where its prompt format ends trained answers
        answers = generate_texts(
            self.model, data.tokenizer, batch, self.generation, stop_token_ids=data.format.stop_token_ids
        )
        return {"index": batch["index"].tolist(), "generated": answers}

    def configure_optimizers(self) -> dict[str, Any]:
        trainable = [p for p in self.parameters() if p.requires_grad]
        optimizer = build_optimizer(trainable, self.optimizer_args)
        scheduler = build_scheduler(optimizer, self.optimizer_args, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        if not clip_sharded_grad_norm(self.trainer.model, gradient_clip_val, gradient_clip_algorithm):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def trainable_keys(self) -> set[str]:
        """Names of the trained tensors as state dicts spell them (FSDP's wrapper prefix removed)."""
        return trained_names(self)

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Only the trained tensors: the frozen (4-bit) base stays out of checkpoints (under FSDP, QLoRAFSDPStrategy
        gathers the same tensors itself)."""
        return trained_tensors(super().state_dict(*args, **kwargs), self.trainable_keys(), kwargs.get("prefix", ""))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[RANDOM_STREAMS_KEY] = all_random_streams(self.trainer.world_size)  # LoRA dropout's, every rank's

    def on_train_start(self) -> None:
        self._step_losses = []  # a fit stopped mid-step before may have left some
        if self.trainer.ckpt_path:
            apply_optimizer_settings(self.trainer, self.optimizer_args)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """With strict loading off, check ourselves that the checkpoint is this model's, with these adapters."""
        fitting = self.trainer.state.fn == "fit"
        check_resume(checkpoint, self.hparams, self.model_name_or_path, fitting)
        if RANDOM_STREAMS_KEY in checkpoint:
            restore_random_streams(checkpoint[RANDOM_STREAMS_KEY], self.global_rank, self.trainer.world_size)
        check_adapter_tensors(checkpoint["state_dict"], self)

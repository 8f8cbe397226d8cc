"""The chunked, label-positions-only loss equals the model's own loss, value and gradients."""

from __future__ import annotations

import torch
from conftest import SAMPLE_DATA, TINY_MODEL

from qlora_lit.data import KoAlpacaDataModule
from qlora_lit.loss import supports_chunked_loss
from qlora_lit.model import LoraArgs, QuantizationArgs
from qlora_lit.module import QLoRAModule


def loss_and_grads(
    loss_chunk_tokens: int, batch: dict, on_the_host: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    module = QLoRAModule(
        TINY_MODEL,
        quantization=QuantizationArgs(compute_dtype="float32"),
        lora=LoraArgs(r=4, alpha=8, dropout=0.0),
        loss_chunk_tokens=loss_chunk_tokens,
    )
    module.configure_model()
    assert supports_chunked_loss(module.model.get_base_model())  # the tiny Llama takes the chunked path
    for name, param in module.named_parameters():  # LoRA B starts at zero: give the adapters a real effect
        if param.requires_grad:
            param.data.normal_(0, 0.02, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    if on_the_host:  # as training does: the labelled positions found before the batch moves to the device
        batch = module.on_before_batch_transfer(dict(batch), 0)
        assert "label_positions" in batch
    loss_sum, count = module.loss_sum(dict(batch))
    mean = loss_sum / count
    mean.backward()
    return mean.detach(), {n: p.grad for n, p in module.named_parameters() if p.requires_grad}


def test_chunked_loss_matches_the_models_own_loss():
    data = KoAlpacaDataModule(SAMPLE_DATA, TINY_MODEL, max_length=128, batch_size=4, val_size=4)
    data.setup()
    batch = next(iter(data.val_dataloader()))
    reference, reference_grads = loss_and_grads(0, batch)
    for on_the_host in (False, True):
        chunked, chunked_grads = loss_and_grads(7, batch, on_the_host)  # a small chunk: many chunks, one partial
        torch.testing.assert_close(chunked, reference, rtol=1e-5, atol=1e-6)
        for name, grad in reference_grads.items():
            torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_the_host_positions_index_the_labels_as_the_loss_lays_them_out():
    """flash-attention takes packed rows as one flat row (`model_inputs`): the positions found on the host must index
    that row, not the rows as collated."""
    module = QLoRAModule(TINY_MODEL, quantization=QuantizationArgs(compute_dtype="float32"), lora=LoraArgs(r=4))
    module.configure_model()
    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8]])
    batch = {"input_ids": labels.clamp(min=0), "labels": labels, "position_ids": torch.tensor([[0, 1, 2, 3]] * 2)}
    assert module.on_before_batch_transfer(dict(batch), 0)["label_positions"].tolist() == [0, 1, 4, 5]  # rows of 3
    module.attn_implementation = "flash_attention_2"
    assert module.on_before_batch_transfer(dict(batch), 0)["label_positions"].tolist() == [0, 1, 5, 6]  # one row of 7

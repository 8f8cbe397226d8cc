"""The label-positions-only loss, at once or chunked, eager or compiled, equals the model's own loss, value and
gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import SAMPLE_DATA, TINY_MODEL

from qlora_lit.data import KoAlpacaDataModule
from qlora_lit.loss import compiled_cross_entropy_sum, cross_entropy_sum
from qlora_lit.model import LoraArgs, QuantizationArgs
from qlora_lit.module import QLoRAModule
from qlora_lit.plain_head import supports_labelled_loss


def loss_and_grads(
    loss_chunk_tokens: int, batch: dict, on_the_host: bool = False, own: bool = False, compiled: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    module = QLoRAModule(
        TINY_MODEL,
        quantization=QuantizationArgs(compute_dtype="float32"),
        lora=LoraArgs(r=4, alpha=8, dropout=0.0),
        loss_chunk_tokens=loss_chunk_tokens,
    )
    module.configure_model()
    assert supports_labelled_loss(module.model.get_base_model())  # the tiny Llama takes the labelled path
    module.compiled_loss = compiled
    for name, param in module.named_parameters():  # LoRA B starts at zero: give the adapters a real effect
        if param.requires_grad:
            param.data.normal_(0, 0.02, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    if on_the_host:  # as training does: the labelled positions found before the batch moves to the device
        batch = module.on_before_batch_transfer(dict(batch), 0)
        assert "label_positions" in batch
    if own:  # the model's own mean over its full logits
        mean = module(**batch).loss
    else:
        loss_sum, count = module.loss_sum(dict(batch))
        mean = loss_sum / count
    mean.backward()
    return mean.detach(), {n: p.grad for n, p in module.named_parameters() if p.requires_grad}


def test_the_labelled_loss_matches_the_models_own_loss():
    data = KoAlpacaDataModule(SAMPLE_DATA, TINY_MODEL, max_length=128, batch_size=4, val_size=4)
    data.setup()
    batch = next(iter(data.val_dataloader()))
    reference, reference_grads = loss_and_grads(0, batch, own=True)
    settings = [(0, False, False), (0, True, False), (7, False, False), (7, True, False)]  # 7: many chunks, one partial
    settings += [(0, True, True), (7, True, True)]  # the cross-entropy compiled (Inductor's CPU code here)
    for chunk, on_the_host, compiled in settings:
        loss, grads = loss_and_grads(chunk, batch, on_the_host, compiled=compiled)
        setting = f"chunk {chunk}, positions on the host {on_the_host}, compiled {compiled}"
        torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6, msg=setting)
        for name, grad in reference_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-7, msg=f"{setting}: {name}")


def test_the_head_computes_logits_at_labelled_positions_only():
    """Prompt and padding positions need no logits: the head sees as many rows as the batch has labels."""
    data = KoAlpacaDataModule(SAMPLE_DATA, TINY_MODEL, max_length=128, batch_size=4, val_size=4)
    data.setup()
    batch = next(iter(data.val_dataloader()))
    module = QLoRAModule(TINY_MODEL, quantization=QuantizationArgs(compute_dtype="float32"), loss_chunk_tokens=0)
    module.configure_model()
    rows = []
    head = module.model.get_base_model().get_output_embeddings()
    head.register_forward_hook(lambda _module, args, output: rows.append(output.shape[:-1].numel()))
    loss_sum, count = module.loss_sum(dict(batch))
    positions = batch["input_ids"].numel()
    assert rows == [count.item()] and 0 < count.item() < positions - batch["input_ids"].shape[0]


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_compiled_cross_entropy_matches_eager_on_a_gpu_for_every_count():
    """Triton's kernels over a 128k vocabulary in bf16, as training runs them: the loss and the logits' gradient of
    eager fp32 cross-entropy, for counts of labelled positions that differ every micro-batch, compiled once."""
    torch._dynamo.reset()
    compiled_cross_entropy_sum.cache_clear()
    torch._dynamo.utils.counters.clear()
    generator = torch.Generator(device="cuda").manual_seed(0)
    for count in (3000, 2711, 4096):
        logits = torch.randn(count, 128256, device="cuda", generator=generator).mul(3).bfloat16().requires_grad_()
        targets = torch.randint(0, 128256, (count,), device="cuda", generator=generator)
        loss = compiled_cross_entropy_sum()(logits, targets)
        loss.backward()
        grad, logits.grad = logits.grad, None
        reference = cross_entropy_sum(logits.float(), targets)
        reference.backward()
        torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(grad.float(), logits.grad.bfloat16().float(), rtol=1e-2, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1

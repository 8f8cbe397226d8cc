"""Execution settings that change speed, never results: compiled decoder layers, and FSDP's wrapping of a 4-bit base."""

from __future__ import annotations

import torch
from conftest import TINY_MODEL

from qlora_lit.fsdp import qlora_wrap_policy
from qlora_lit.model import LoraArgs, QuantizationArgs, compile_decoder_layers
from qlora_lit.module import QLoRAModule


def tiny_module(**settings) -> QLoRAModule:
    module = QLoRAModule(
        TINY_MODEL, quantization=QuantizationArgs(compute_dtype="float32"), lora=LoraArgs(dropout=0.0), **settings
    )
    torch.manual_seed(0)  # LoRA A is drawn at random when the adapters are attached
    module.configure_model()
    for lora_b in (p for name, p in module.named_parameters() if "lora_B" in name):
        torch.nn.init.normal_(lora_b, std=0.05)  # B starts at zero: make the adapters count
    return module


def loss_and_gradients(module: QLoRAModule, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = module(ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in module.named_parameters() if p.grad is not None}


def test_compiled_decoder_layers_give_the_eager_loss_and_gradients():
    ids = torch.randint(3, 2000, (2, 24), generator=torch.Generator().manual_seed(1))
    eager_loss, eager_grads = loss_and_gradients(tiny_module(), ids)
    compiled = tiny_module()
    compile_decoder_layers(compiled.model)  # what model.compile does on a GPU
    layers = compiled.model.get_base_model().model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    compiled_loss, compiled_grads = loss_and_gradients(compiled, ids)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys() and eager_grads
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert set(compiled.state_dict()) == set(tiny_module().state_dict())  # checkpoints keep their key names


def test_compile_is_skipped_with_a_message_on_a_cpu(caplog):
    with caplog.at_level("INFO"):
        layers = tiny_module(compile=True).model.get_base_model().model.layers
    assert all(layer._compiled_call_impl is None for layer in layers)
    assert "model.compile applies on GPUs only" in caplog.text


def test_fsdp_units_never_mix_frozen_and_trained_tensors():
    """FSDP (GPU only, so not run here) flattens each unit's own parameters into one buffer: the policy must make
    every decoder layer a unit and every LoRA matrix a unit of its own, and leave the frozen rest together."""
    model = tiny_module().model
    units = [m for m in model.modules() if qlora_wrap_policy(m, recurse=False, nonwrapped_numel=0)]
    layers = model.get_base_model().model.layers
    assert all(layer in units for layer in layers)
    lora_matrices = [m for name, m in model.named_modules() if name.endswith((".lora_A.default", ".lora_B.default"))]
    assert lora_matrices and all(m in units for m in lora_matrices)
    assert all(qlora_wrap_policy(m, recurse=True, nonwrapped_numel=0) for m in model.modules())
    for unit in [*units, model]:  # what stays in a unit once its wrapped children are taken out
        inner = {id(p) for child in unit.modules() if child is not unit and child in units for p in child.parameters()}
        own = [p for p in unit.parameters() if id(p) not in inner]
        assert len({p.requires_grad for p in own}) <= 1, type(unit).__name__


def test_fsdp_checkpoint_names_match_the_trained_tensors():
    module = tiny_module()
    trained = module.trainable_keys()
    assert trained and all("lora_" in key for key in trained)
    checkpoint = {"state_dict": {**dict(module.model.named_parameters(prefix="model")), "extra": torch.zeros(1)}}
    module.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == trained  # the base is dropped even when a strategy hands it over


def test_varlen_attention_keeps_padded_batches_masked_as_sdpa_does():
    """Validation batches (right padding) and generation (left padding) carry an attention mask and no packed
    positions: `varlen` must give exactly sdpa's logits there, padding never attended."""
    ids = torch.randint(3, 2000, (2, 12), generator=torch.Generator().manual_seed(2))
    right = torch.ones_like(ids)
    right[1, 8:] = 0
    left = torch.ones_like(ids)
    left[1, :4] = 0
    sdpa, varlen = tiny_module(), tiny_module(attn_implementation="varlen")
    with torch.no_grad():
        for mask in (right, left):
            expected = sdpa(ids, attention_mask=mask).logits
            torch.testing.assert_close(varlen(ids, attention_mask=mask).logits, expected, rtol=1e-5, atol=1e-5)
        generated = {
            name: m.model.generate(input_ids=ids, attention_mask=left, max_new_tokens=5, do_sample=False)
            for name, m in (("sdpa", sdpa), ("varlen", varlen))
        }
    assert torch.equal(generated["varlen"], generated["sdpa"])

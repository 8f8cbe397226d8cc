"""bench/guards.py's condition: once the first steps have compiled the layers' graphs, skipping all but the guards
that choose between them still gives the eager loss and gradients for rows of new lengths."""

from __future__ import annotations

import torch
from test_speedups import loss_and_gradients, tiny_module

from qlora_lit.model import compile_decoder_layers


def test_skipped_guards_keep_the_eager_results_for_new_lengths():
    compiled, eager = tiny_module(gradient_checkpointing=False), tiny_module(gradient_checkpointing=False)
    compile_decoder_layers(compiled.model)
    torch._dynamo.reset()
    loss_and_gradients(compiled, torch.randint(3, 2000, (1, 24)))  # compiles both graphs (layer 0's input, the rest)
    torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
    try:
        for length in (17, 40):
            ids = torch.randint(3, 2000, (1, length), generator=torch.Generator().manual_seed(length))
            for module in (compiled, eager):
                module.zero_grad()
            compiled_loss, compiled_grads = loss_and_gradients(compiled, ids)
            eager_loss, eager_grads = loss_and_gradients(eager, ids)
            torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
            for name, grad in eager_grads.items():
                torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    finally:
        torch.compiler.set_stance("default")

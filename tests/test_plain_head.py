"""Which forwards plain_head.py reads as a plain head (the labelled loss is the model's loss), on small stand-ins of
the patterns transformers' causal LMs use; tests/test_zoo.py checks the real architectures."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from qlora_lit.plain_head import supports_labelled_loss


class Plain(nn.Module):
    def __init__(self, **settings) -> None:
        super().__init__()
        self.config = SimpleNamespace(**settings)
        self.lm_head = nn.Linear(4, 8, bias=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, hidden_states, labels=None):
        logits = self.lm_head(hidden_states)
        loss = None
        return loss, logits


class Capped(Plain):
    def forward(self, hidden_states, labels=None):
        logits = self.lm_head(hidden_states)
        if self.config.final_logit_softcapping is not None:
            logits = logits / self.config.final_logit_softcapping
            logits = torch.tanh(logits)
            logits = logits * self.config.final_logit_softcapping
        loss = None
        return loss, logits


class Derived(Plain):
    def forward(self, hidden_states, labels=None):
        logits = self.lm_head(hidden_states)
        scaled = logits / self.config.logits_scaling
        loss = nn.functional.cross_entropy(scaled, labels)
        return loss, logits


class Logged(Plain):
    def forward(self, hidden_states, labels=None):
        logits = self.lm_head(hidden_states)
        self.record(logits)  # a statement that reads the logits without assigning anything
        loss = None
        return loss, logits

    def record(self, logits) -> None:
        pass


namespace: dict = {}
exec("def forward(self, hidden_states, labels=None):\n    return None, self.lm_head(hidden_states)\n", namespace)
NoSource = type("NoSource", (Plain,), {"forward": namespace["forward"]})  # built at run time: no source file


class OtherName(Plain):
    def forward(self, hidden_states, labels=None):
        lm_logits = self.lm_head(hidden_states)
        loss = None
        return loss, lm_logits


@pytest.mark.parametrize(
    ("model", "plain"),
    [
        (Plain(), True),
        (Capped(final_logit_softcapping=None), True),  # Gemma 3: the code is there, the setting off
        (Capped(final_logit_softcapping=30.0), False),  # Gemma 2
        (Derived(logits_scaling=1.0), True),
        (Derived(logits_scaling=8.0), False),  # Granite, through another tensor
        (OtherName(), False),  # the head's output not found: the model's own loss
        (Logged(), False),  # a call on the logits: it may change them, so the model's own loss
        (Plain(output_router_logits=True), False),  # a router loss is added to the cross-entropy
        (NoSource(), False),
        (type("Lambda", (Plain,), {"forward": lambda self, hidden_states: self.lm_head(hidden_states)})(), False),
    ],
    ids=["plain", "cap-off", "capped", "scale-one", "scaled", "other-name", "logged", "router", "no-source", "lambda"],
)
def test_only_forwards_that_leave_the_heads_logits_as_they_are_take_the_labelled_loss(model, plain):
    assert supports_labelled_loss(model) is plain

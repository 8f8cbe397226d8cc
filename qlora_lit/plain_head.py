"""Whether a causal LM's loss is the cross-entropy of its head's outputs, which the labelled loss (loss.py) computes
from the decoder's hidden states and the head itself.

Some architectures change the logits between the head and the loss (Gemma 2's soft-capping, Cohere's `logit_scale`,
Granite's `logits_scaling`) or add a loss of their own (a mixture of experts' router loss, with
`output_router_logits`). A list of such settings would miss the next architecture, so the causal LM's `forward` is
read instead: the statements that change `logits`, or make another tensor from them, after the head's call and before
the loss, each with the setting an enclosing `if <setting> is not None:` needs (Gemma 3 has the soft-capping code,
with the setting off). A forward that names its head's output otherwise is not read: such models keep their own loss.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from functools import cache

import torch

_SETTING = re.compile(r"self\.(?:config\.)?(\w+)")  # self.config.logits_scaling, self.logit_scale


def supports_labelled_loss(model: torch.nn.Module) -> bool:
    """The model's loss is the cross-entropy of its head's outputs here; False where it may not be (then the model's
    own loss is used)."""
    if model.get_output_embeddings() is None or getattr(model.config, "output_router_logits", False):
        return False
    changes = logit_changes(type(model))
    return changes is not None and all(_inert(text, guard, model) for text, guard in changes)


@cache
def logit_changes(model_class: type) -> tuple[tuple[str, str | None], ...] | None:
    """(statement, the setting its `if ... is not None` guard needs, or None) for each change of the logits between the
    head's call and the loss in `model_class.forward`; None where its source or the head's call is not found."""
    try:
        function = ast.parse(textwrap.dedent(inspect.getsource(model_class.forward))).body[0]
    except (OSError, TypeError, SyntaxError):
        return None
    if not isinstance(function, ast.FunctionDef):  # a lambda, or a forward assigned from elsewhere
        return None
    found: list[tuple[ast.stmt, str | None]] = []
    _in_order(function.body, None, found)
    heads = [i for i, (statement, _) in enumerate(found) if _assigns_logits(statement) and _calls_self(statement)]
    if not heads:
        return None
    changes = []
    for statement, guard in found[heads[0] + 1 :]:
        if "loss" in ast.unparse(statement):
            break
        if _assigns_logits(statement) or _reads_logits(statement):
            changes.append((ast.unparse(statement), guard))
    return tuple(changes)


def _in_order(statements: list[ast.stmt], guard: str | None, found: list[tuple[ast.stmt, str | None]]) -> None:
    """The statements of a function body in source order, with `if` blocks opened: each with the setting that the
    innermost enclosing `if <setting> is not None:` tests."""
    for statement in statements:
        if isinstance(statement, ast.If):
            test = statement.test
            tests_a_setting = isinstance(test, ast.Compare) and isinstance(test.ops[0], ast.IsNot)
            settings = _SETTING.findall(ast.unparse(test.left)) if tests_a_setting else []
            _in_order(statement.body, settings[-1] if settings else guard, found)
            _in_order(statement.orelse, guard, found)
        else:
            found.append((statement, guard))


def _assigns_logits(statement: ast.stmt) -> bool:
    targets = statement.targets if isinstance(statement, ast.Assign) else [getattr(statement, "target", None)]
    return isinstance(statement, ast.Assign | ast.AugAssign) and any(
        isinstance(target, ast.Name) and target.id == "logits" for target in targets
    )


def _reads_logits(statement: ast.stmt) -> bool:
    """`scaled = logits * self.scale`: another tensor made from the logits, which the loss may take instead."""
    value = getattr(statement, "value", None)
    return value is not None and any(isinstance(node, ast.Name) and node.id == "logits" for node in ast.walk(value))


def _calls_self(statement: ast.stmt) -> bool:
    """`logits = self.lm_head(...)` (or `self.embed_out`, ...): the head's call."""
    value = statement.value
    return isinstance(value, ast.Call) and _SETTING.fullmatch(ast.unparse(value.func)) is not None


def _inert(text: str, guard: str | None, model: torch.nn.Module) -> bool:
    """The change does not run (its guard's setting is None here) or is made only by settings that are None or 1."""
    if guard is not None and _setting(model, guard) is None:
        return True
    names = _SETTING.findall(text.split("=", 1)[-1])  # what an assignment assigns, or the whole statement
    values = [_setting(model, name) for name in names]
    return bool(names) and all(value is None or (isinstance(value, int | float) and value == 1) for value in values)


def _setting(model: torch.nn.Module, name: str) -> object:
    return getattr(model.config, name, getattr(model, name, "unknown"))

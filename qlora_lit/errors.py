"""User-facing errors: one clear message, printed without a traceback by the CLI."""

from __future__ import annotations

import errno


class ConfigError(ValueError):
    """A setting, file or name given by the user cannot work; the message says which and why."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, say); the message says where and what to try."""


def not_found_message(kind: str, name: str, err: Exception) -> str:
    return (
        f"could not load the {kind} {name!r}: {err}\n"
        f"It is neither a local folder/file nor reachable on the Hugging Face hub from here. Fix it by giving a local "
        f"path, setting HF_HOME to a cache that already holds it (with HF_HUB_OFFLINE=1 when offline), or logging in "
        f"(`hf auth login`) if it is gated."
    )


def remote_code_message(name_or_path: str) -> str:
    return (
        f"the model {name_or_path!r} ships its own Python code, which qlora_lit runs only when you say so: "
        "model.trust_remote_code: true in your config (fit, predict) or --trust_remote_code true (generate, export). "
        "Only for code you trust; a setting saved in an adapter, model folder or checkpoint is never enough"
    )


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(err: BaseException) -> bool:
    """No space left (or over quota): an OSError, or safetensors' error, whose Rust writer keeps only the text."""
    if isinstance(err, OSError):
        return err.errno in DISK_FULL_ERRNOS
    return any(f"(os error {code})" in str(err) for code in DISK_FULL_ERRNOS)

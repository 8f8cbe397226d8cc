"""User-facing errors: one clear message, printed without a traceback by the CLI."""

from __future__ import annotations

import errno
from pathlib import Path

from qlora_lit.downloads import unfinished_load


class ConfigError(ValueError):
    """A setting, file or name given by the user cannot work; the message says which and why."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, say); the message says where and what to try."""


def not_found_message(kind: str, name: str, err: Exception) -> str:
    """Why a model, tokenizer or dataset did not load: a download or copy that did not finish, a local folder that
    lacks files, a cache that cannot be written, or a name found neither here nor on the hub."""
    unfinished = unfinished_load(kind, resolve_builtin(name))
    if unfinished:
        return unfinished
    local = Path(name).expanduser()
    if local.is_dir():
        return incomplete_folder_message(kind, name, local, err)
    if local.exists():
        return f"could not load the {kind} {name!r}: it is a file; give the folder that holds it ({err})"
    if isinstance(err, OSError) and err.errno in CANNOT_WRITE_ERRNOS:
        return (
            f"could not load the {kind} {name!r}: {err}. The Hugging Face cache it would be kept in cannot be "
            "written (a read-only home folder?): point HF_HOME at a writable folder"
        )
    return (
        f"could not load the {kind} {name!r}: {err}\n"
        f"It is neither a local folder/file nor reachable on the Hugging Face hub from here. Fix it by giving a local "
        f"path, setting HF_HOME to a cache that already holds it (with HF_HUB_OFFLINE=1 when offline), or logging in "
        f"(`hf auth login`) if it is gated."
    )


def remote_code_message(name_or_path: str) -> str:
    return (
        f"the model {name_or_path!r} ships its own Python code, which qlora_lit runs only when you say so: "
        "model.trust_remote_code: true in your config (fit, predict) or --trust_remote_code true (generate, chat, "
        "export). Only for code you trust; a setting saved in an adapter, model folder or checkpoint is never enough"
    )


TOKENIZER_FILES = {"tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tiktoken.model"}


def missing_files(kind: str, names: set[str]) -> list[str]:
    """What a folder save_pretrained wrote a model (config and weights) or a tokenizer to has, and this one lacks."""
    if kind == "tokenizer":
        return [] if names & TOKENIZER_FILES else ["tokenizer files (tokenizer.json, or tokenizer.model)"]
    missing = [] if "config.json" in names else ["config.json"]
    if not any(name.endswith((".safetensors", ".bin")) for name in names):
        missing.append("weights (model.safetensors or pytorch_model.bin, or their shards)")
    return missing


def incomplete_folder_message(kind: str, name: str, folder: Path, err: Exception) -> str:
    """What a local folder lacks, rather than the library's guess (transformers blamed a missing sentencepiece
    package for a model folder without tokenizer files)."""
    names = {path.name for path in folder.iterdir()}
    missing = missing_files(kind, names)
    if not missing:  # complete by its file names: the library's reason is the one to give
        return f"could not load the {kind} {name!r} from its folder: {err}"
    shown = sorted(names)[:12]
    holds = f"it holds {shown}{' ...' if len(names) > 12 else ''}" if names else "it is empty"
    return (
        f"could not load the {kind} {name!r}: the folder has no {' and no '.join(missing)} ({holds}). Give the "
        f"folder save_pretrained wrote the {kind} to, or save what is missing into it"
    )


CANNOT_WRITE_ERRNOS = (errno.EACCES, errno.EROFS, errno.ENOTDIR, errno.EPERM)


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(err: BaseException) -> bool:
    """No space left (or over quota): an OSError, or safetensors' error, whose Rust writer keeps only the text."""
    if isinstance(err, OSError):
        return err.errno in DISK_FULL_ERRNOS
    return any(f"(os error {code})" in str(err) for code in DISK_FULL_ERRNOS)


def resolve_builtin(name: str) -> str:
    """`builtin:<asset>` as the shipped file's path (qlora_lit.assets, which imports this module, resolves it)."""
    if not name.startswith("builtin:"):
        return name
    return str(Path(__file__).parent / "assets" / name.removeprefix("builtin:"))

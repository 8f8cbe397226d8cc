"""What a model or data set load that stopped halfway left behind, and what to retry.

A download from the hub that was cut off (a dropped connection, a killed job) leaves its files in the cache
(`HF_HOME/hub`) as `blobs/<hash>.incomplete`, which huggingface_hub continues on the next download; the snapshot
names only finished files, so an offline load finds the model "missing". A copy of a model folder that did not
finish leaves safetensors files shorter than their header says. Both are said as such (the file, and what to run
again), instead of "not found" or safetensors' "incomplete metadata" traceback; a retry needs no cleaning up first.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from huggingface_hub import constants


def unfinished_load(kind: str, name: str) -> str | None:
    """Why loading the `kind` ("model", "tokenizer", "dataset") `name` failed, when a download or copy of it did not
    finish; None otherwise."""
    local = Path(name).expanduser()
    if local.exists():
        cut = cut_short_files(local) if local.is_dir() else []
        if cut:
            return (
                f"could not load the {kind} from {local}: {'; '.join(cut)} (a copy or download that did not finish). "
                "Copy or download it again, then run the same command"
            )
        return None
    return partial_download(kind, name)


def cut_short_files(folder: Path) -> list[str]:
    """Each safetensors file in `folder` that is shorter than its header says, with how much of it is there."""
    return [message for path in sorted(folder.rglob("*.safetensors")) if (message := cut_short(path))]


def cut_short(path: Path) -> str | None:
    """`path` and how much of it is there, when the file is shorter than its safetensors header says it is."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as file:
            (header_size,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(header_size)) if 8 + header_size <= size else None
    except (struct.error, ValueError):
        return f"{path} is not a whole safetensors file"
    if header is None:
        return f"{path} is cut short ({size:,} bytes, less than its own header)"
    needed = (
        8
        + header_size
        + max((entry["data_offsets"][1] for entry in header.values() if "data_offsets" in entry), default=0)
    )
    return f"{path} is cut short ({size:,} of its {needed:,} bytes)" if size < needed else None


def partial_download(kind: str, repo_id: str) -> str | None:
    """A message when the hub cache holds unfinished downloads of `repo_id`, else None."""
    repo_type = "datasets" if kind == "dataset" else "models"
    folder = Path(constants.HF_HUB_CACHE) / f"{repo_type}--{repo_id.replace('/', '--')}"
    partial = sorted((folder / "blobs").glob("*.incomplete"))
    if not partial:
        return None
    return (
        f"the download of the {kind} {repo_id!r} did not finish: {len(partial)} file(s) in {folder / 'blobs'} are "
        "partial (*.incomplete). Run the same command again where the hub can be reached (without HF_HUB_OFFLINE=1): "
        "huggingface_hub goes on from where it stopped, nothing needs deleting first"
    )

"""Files a training run leaves beside its adapter: their names, shared by the callbacks that write them and the
commands that read them (generate, chat, export), and the reading of the run's saved config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CONFIG_NAME = "qlora_lit_config.yaml"  # the run's resolved config (Lightning's config.yaml), copied into adapter/
DATA_STATS_NAME = "data_stats.json"


def read_run_config(folder: str | Path | None) -> dict[str, Any]:
    """The training run's resolved config saved beside an adapter (or a merged model); {} if there is none."""
    path = Path(folder) / CONFIG_NAME if folder else None
    if path is None or not path.is_file():
        return {}
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}

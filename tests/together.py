"""Several demo fits of one config started at the same moment in one runs folder, as the jobs of an array start
(tests/test_run_folders.py):

    python tests/together.py OUT N [fit arguments ...] [--then [fit arguments ...]] ...

Each phase starts N fits at once and waits for them; `--then` begins the next phase. Fit i of phase p logs to
OUT/p-i.log; OUT/exits.json holds the exit codes, per phase. `{i}` in an argument becomes the fit's number (a
per-job `--trainer.logger.init_args.version job-{i}`, say).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forked import fork_together, wait  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = ["fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--trainer.enable_progress_bar", "false"]


def phases(arguments: list[str]) -> list[list[str]]:
    split = [[]]
    for argument in arguments:
        split.append([]) if argument == "--then" else split[-1].append(argument)
    return split


def main() -> None:
    out, count = Path(sys.argv[1]), int(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    exits = []
    for phase, extra in enumerate(phases(sys.argv[3:])):
        fits = [
            ([*BASE, *(arg.replace("{i}", str(i)) for arg in extra)], out / f"{phase}-{i}.log", {})
            for i in range(count)
        ]
        exits.append([wait(pid) for pid in fork_together(fits)])
    (out / "exits.json").write_text(json.dumps(exits))


if __name__ == "__main__":
    main()

"""Fits in processes forked from one that imported qlora_lit once and computes nothing itself (tests/chaos.py,
tests/together.py): a start costs no Python start-up (about 7 s on the CI machine), and each fit is the real CLI in
a process of its own, which a kill -9 really ends."""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import qlora_lit.cli
from qlora_lit.cli import cli_main


def fork_fit(args: list[str], log: Path, env: dict[str, str] | None = None, before: Callable | None = None) -> int:
    """Start `cli_main(args)` in a forked child with its output appended to `log`, `env` set and `before()` run
    first; returns the child's pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.environ.update(env or {})
        output = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(output, 1)
        os.dup2(output, 2)
        if before is not None:
            before()
        cli_main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0 if isinstance(exit_.code, int | None) else 1
    except BaseException:  # noqa: BLE001 - the child reports and ends, whatever happened
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def wait(pid: int, timeout_s: float | None = None) -> int | None:
    """The child's exit code, or minus the signal that ended it; None if it still runs after `timeout_s`."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        done, status = os.waitpid(pid, 0 if deadline is None else os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def with_callback(callback) -> None:
    """In a child: the CLI's default callbacks plus `callback`."""
    defaults = qlora_lit.cli.trainer_defaults

    def trainer_defaults() -> dict:
        values = defaults()
        return {**values, "callbacks": [*values["callbacks"], callback]}

    qlora_lit.cli.trainer_defaults = trainer_defaults


def fork_together(runs: list[tuple[list[str], Path, dict[str, str]]], before: Callable | None = None) -> list[int]:
    """Fork one child per (args, log, env) and let them all start `cli_main` at the same moment (each waits on a
    pipe until every child exists), after `before()`; returns their pids."""
    read_end, write_end = os.pipe()

    def start_signal() -> None:
        os.close(write_end)
        os.read(read_end, 1)  # returns when the parent closes its end: all children go at once
        if before is not None:
            before()

    pids = [fork_fit(args, log, env, before=start_signal) for args, log, env in runs]
    os.close(read_end)
    os.close(write_end)
    return pids

"""When one rank of a multi-process run dies, hangs or fails, the others stop within seconds, saying which rank.

Without it, gloo ends the survivors with a raw "Connection closed by peer" traceback from whatever collective they
were in, naming no rank; NCCL does not notice a dead peer at all, and the survivors' GPUs sit in the collective
until the process-group timeout (30 minutes) ends them.

Each rank runs a thread that talks to the run's rendezvous store (the TCPStore that rank 0, or torchrun's agent,
hosts for `init_process_group`) on a connection of its own, once a second:

- it counts its own heartbeat, and watches the next rank's (rank r watches r+1, the last rank rank 0): a neighbour on
  the same host whose process is gone is seen at once, any other after `silence_s` seconds without a heartbeat
  (killed, frozen, its node or network down);
- a rank whose training raises (out of memory, a bad batch) posts its error in the store before it exits;
- the first failure posted is the verdict: every other rank prints it as one message naming the rank and what to do,
  and exits. A store that no longer answers means its host, rank 0, is gone.

A rank that finished normally says so first, so its silence is not taken for a failure; rank 0, which hosts the
store, leaves last.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

HEARTBEAT_S = 1.0
IDENTIFY_WAIT_S = 10.0  # how long a rank waits at start for rank 0's identity
ACK_WAIT_S = 3.0  # how long rank 0 keeps the store up for the others to read a verdict
EXIT_WAIT_S = 1.0  # a killed process's sockets close before it shows as ended: how long to look once its store fails
PEER_LOST_EXIT = 75  # EX_TEMPFAIL: another rank died or hung; the run can go on from its last checkpoint
PEER_FAILED_EXIT = 1  # another rank raised an error, which would most likely recur
ENDED = "ended without a word (killed: kill -9, the out-of-memory killer, a crash in native code)"
HANGS = "(it hangs, or its node or network is down)"
RESUME_HINT = "the checkpoints already written are whole: resume with --ckpt_path last"

_active: Watcher | None = None  # this process's watcher, for cli_main


class RankWatch(Callback):
    """Stops every rank of a multi-process run within seconds when one dies, hangs or raises, with one message that
    names it (see the module). Does nothing in a single process.

    Args:
        silence_s: seconds without a heartbeat after which a rank on another host (or a frozen one) counts as lost.
    """

    def __init__(self, silence_s: float = 30.0) -> None:
        self.silence_s = silence_s
        self.watcher: Watcher | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        global _active
        if trainer.world_size < 2 or not dist.is_initialized() or self.watcher is not None:
            return
        store = watch_store(timeout_s=self.silence_s)
        if store is None:
            return
        self.watcher = Watcher(store, trainer.global_rank, trainer.world_size, self.silence_s)
        self.watcher.start()
        _active = self.watcher

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self.watcher is None:
            return
        if isinstance(exception, SystemExit):  # every rank stops for a signal (PreemptionCheckpoint): no failure
            self.teardown(trainer, pl_module, "fit")
        elif not is_peer_loss(exception):
            self.watcher.post_own_failure(exception)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        global _active
        if self.watcher is not None:
            self.watcher.finish()
            self.watcher = _active = None


def watch_store(timeout_s: float) -> dist.Store | None:
    """A connection of our own to the run's TCPStore, so a store that stops answering (its host frozen) times out
    after `timeout_s` instead of the process group's 30 minutes, and the thread never waits behind the process
    group's own store calls. None when the run's store is no TCPStore."""
    store = dist.distributed_c10d._get_default_store()
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    if not isinstance(store, dist.TCPStore):
        return None
    client = dist.TCPStore(store.host, store.port, is_master=False, timeout=timedelta(seconds=timeout_s))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun's store outlives a restarted attempt
    return dist.PrefixStore(f"qlora_lit/rank_watch/{attempt}", client)


class Watcher(threading.Thread):
    """The thread of one rank (see the module)."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, silence_s: float) -> None:
        super().__init__(daemon=True, name="qlora_lit-rank-watch")
        self.store, self.rank, self.world_size, self.silence_s = store, rank, world_size, silence_s
        self.stopping = threading.Event()
        self.failing = False  # this rank raised: it ends on its own, with its own error
        self.progress = time.monotonic()  # when the watcher last began a round of store calls
        self.neighbour = (rank + 1) % world_size
        self.known: dict[int, list[str]] = {}  # rank -> [host, pid, machine], once it has posted them
        self.known[rank] = [socket.gethostname(), str(os.getpid()), _pid_space()]
        self.store.set(f"who/{rank}", " ".join(self.known[rank]))
        if rank != 0:  # rank 0 posts itself as it starts too: known now, a hang of rank 0 (its store frozen with it)
            try:  # can still be named with its pid, even if it comes before the first round of the watch
                self.store.wait(["who/0"], timedelta(seconds=IDENTIFY_WAIT_S))
                self.identify(0)
            except Exception:  # noqa: BLE001 - not posted in time: the rounds keep asking
                pass

    def start(self) -> None:
        super().start()
        threading.Thread(target=self.guard, daemon=True, name="qlora_lit-rank-watch-guard").start()

    def guard(self) -> None:
        """A store whose host is frozen never answers, and a store call waits for good: the watcher stuck in one for
        `silence_s` means rank 0 hangs."""
        while not self.stopping.wait(HEARTBEAT_S):
            stuck_s = time.monotonic() - self.progress
            if stuck_s > self.silence_s + HEARTBEAT_S:
                self.stop_for(f"rank 0{self.describe(0)} has not answered for {stuck_s:.0f} s {HANGS}", False)

    def run(self) -> None:
        last_beat, last_change = -1, time.monotonic()
        while not self.stopping.wait(HEARTBEAT_S):
            self.progress = time.monotonic()
            if self.rank != 0 and self.process_is_gone(0):  # its store is gone with it: no asking the store
                self.stop_for(f"rank 0{self.describe(0)} {ENDED}", store_alive=False)
                return
            try:
                self.store.add(f"beat/{self.rank}", 1)
                if self.store.check(["failure"]):
                    self.stop_for(self.store.get("failure").decode())
                    return
                if self.store.check([f"done/{self.neighbour}"]):
                    continue
                beat = self.store.add(f"beat/{self.neighbour}", 0)
                self.identify(self.neighbour)
                self.identify(0)
                if beat != last_beat:
                    last_beat, last_change = beat, time.monotonic()
                lost = self.lost_neighbour(time.monotonic() - last_change)
                if lost:
                    self.post(lost)
                    return
            except Exception as err:  # noqa: BLE001 - any store error: its host is gone or does not answer
                if self.stopping.is_set():
                    return
                if self.rank != 0 and self.ends_within(0, EXIT_WAIT_S):  # killed since the check at the top
                    self.stop_for(f"rank 0{self.describe(0)} {ENDED}", store_alive=False)
                else:
                    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
                    self.stop_for(f"rank 0{self.describe(0)} is gone: the store it hosts fails ({reason})", False)
                return

    def identify(self, rank: int) -> None:
        if rank not in self.known and self.store.check([f"who/{rank}"]):
            self.known[rank] = self.store.get(f"who/{rank}").decode().split(" ")

    def describe(self, rank: int) -> str:
        return f" (pid {self.known[rank][1]} on {self.known[rank][0]})" if rank in self.known else ""

    def lost_neighbour(self, silent_s: float) -> str | None:
        """Why the watched rank counts as lost, or None while it is fine."""
        who = self.describe(self.neighbour)
        if self.process_is_gone(self.neighbour):
            return f"rank {self.neighbour}{who} {ENDED}"
        if silent_s > self.silence_s:
            return f"rank {self.neighbour}{who} has not answered for {silent_s:.0f} s {HANGS}"
        return None

    def ends_within(self, rank: int, seconds: float) -> bool:
        """Whether `rank`'s process (on this machine) shows as ended within `seconds`."""
        deadline = time.monotonic() + seconds
        while not self.process_is_gone(rank):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def process_is_gone(self, rank: int) -> bool:
        """Whether `rank`'s process has ended, when it runs on this machine (same boot) in this pid namespace (a pid
        means nothing elsewhere, and host names may repeat across containers)."""
        if rank not in self.known:
            return False
        host, pid, space = self.known[rank]
        if host != socket.gethostname() or space != _pid_space():
            return False
        try:
            with open(f"/proc/{pid}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] in "ZX"  # ended, not yet reaped by its parent
        except FileNotFoundError:
            return True
        except OSError:
            return False

    def post(self, failure: str) -> None:
        """Make `failure` the run's verdict unless another rank posted one first, then stop for the verdict."""
        self.store.compare_set("failure", "", failure)
        self.stop_for(self.store.get("failure").decode())

    def post_own_failure(self, error: BaseException) -> None:
        """This rank raised `error`: post it for the other ranks, which stop; this rank ends with its own error."""
        self.failing = True
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        failure = f"rank {self.rank}{self.describe(self.rank)} failed: {type(error).__name__}: {first_line}"
        try:
            self.store.compare_set("failure", "", failure)
            self.keep_store_up()
        except Exception:  # noqa: BLE001 - nothing more to tell
            pass

    def stop_for(self, verdict: str, store_alive: bool = True) -> None:
        """Acknowledge the verdict and, unless this rank is failing on its own, end the process with it."""
        try:
            if store_alive:
                self.store.add("acks", 1)
                self.keep_store_up()
        except Exception:  # noqa: BLE001
            pass
        if self.failing:
            return
        lost = " failed: " not in verdict
        advice = RESUME_HINT if lost else "its error is in its own output"
        print(
            f"qlora_lit: training stopped: {verdict}. Rank {self.rank} stops too; {advice}", file=sys.stderr, flush=True
        )
        os._exit(PEER_LOST_EXIT if lost else PEER_FAILED_EXIT)  # the main thread may sit in a collective for good

    def keep_store_up(self) -> None:
        """On rank 0, which hosts the store, wait a little for the other ranks to read the verdict."""
        if self.rank != 0:
            return
        deadline = time.monotonic() + ACK_WAIT_S
        while time.monotonic() < deadline and self.store.add("acks", 0) < self.world_size - 1:
            time.sleep(0.1)

    def finish(self) -> None:
        """The run ended normally here: stop watching and say so, so this rank's silence is no failure. Rank 0
        waits for the others to say it too before its store goes away with it."""
        self.stopping.set()
        self.join()
        try:
            self.store.set(f"done/{self.rank}", "1")
            finished = self.store.add("done", 1)
            deadline = time.monotonic() + self.silence_s
            while self.rank == 0 and finished < self.world_size and time.monotonic() < deadline:
                time.sleep(0.1)
                finished = self.store.add("done", 0)
        except Exception:  # noqa: BLE001 - the run ended anyway
            pass


def is_peer_loss(error: BaseException) -> bool:
    """Whether `error` is a collective failing because another process went away (not this rank's own failure)."""
    if isinstance(error, (dist.DistNetworkError, dist.DistBackendError)):
        return True
    text = str(error)
    return any(sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL"))


def wait_for_verdict(error: BaseException) -> None:
    """For the CLI: a collective failed because another rank went away; the watcher names it and ends this process
    within `silence_s` seconds. Returns only if it does not (then the error is raised as it is)."""
    watcher = _active
    if watcher is None or not is_peer_loss(error):
        return
    watcher.join(timeout=watcher.silence_s + 2 * HEARTBEAT_S + ACK_WAIT_S)


def _pid_space() -> str:
    """This machine's boot and this process's pid namespace: equal for two processes whose pids mean the same."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return f"unknown-{uuid.uuid4()}"  # never equal: no pid check

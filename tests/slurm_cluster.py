"""A real, private Slurm cluster on this machine for tests (pytest fixtures + helpers): one node, or several.

Usage in a test module::

    from slurm_cluster import slurm_cluster_fixture  # noqa: F401  (provides `slurm_cluster`)

    @pytest.mark.slurm
    def test_x(slurm_cluster, tmp_path):
        job = slurm_cluster.submit(script, "arg", cwd=tmp_path)
        slurm_cluster.wait_for(job, "COMPLETED", timeout=60)
        print(slurm_cluster.read_output(job))

What the fixtures do (`slurm_cluster`: one node, session scope; `two_node_slurm_cluster`: two nodes, module scope):

* skips (fails instead if ``QLORA_REQUIRE_SLURM=1``, for a CI that must run them) when not on
  Linux, not root, when a Slurm/munge binary is missing (``.ci/install-slurm.sh`` installs
  Debian's ``slurm-wlm`` + ``munge``), or when the daemons do not come up;
* starts its *own* ``munged`` (fresh key, socket in the temp dir: the system munge is not used
  or touched), writes a minimal ``slurm.conf`` (cons_tres, linuxproc, task/none, one node with this
  machine's CPUs/memory from ``slurmd -C``, free TCP ports, everything under a temp dir),
  starts ``slurmctld -D`` and ``slurmd -D`` and waits until ``sinfo`` says the node is idle;
* with several nodes, starts one ``slurmd -N NAME`` per node on this machine, each listening on its own port
  (Slurm's "multiple slurmd" setup: Debian's build has it, ``scontrol show config`` says
  ``MULTIPLE_SLURMD = Yes``). The first node is named after the machine, the others ``<machine>-node2`` ...;
  Slurm sorts a job's node list, so the machine's own name comes first in ``SLURM_NODELIST`` and the
  rendezvous address Lightning takes from it resolves to this machine, as the first node of a real allocation
  does;
* tears down whatever it started, even when tests fail: cancels its jobs, stops the daemons,
  then kills leftover job processes (recognised by a marker variable that only this fixture
  puts into the daemons' and jobs' environment). Leftovers of an earlier, hard-killed pytest run
  (same marker, dead owner pid) are cleaned at start-up.

Facts (Slurm 22.05, Debian 12) this cluster is tuned for:

* ``scontrol requeue`` makes a job PENDING (Reason=BeginTime) until ``cred_expire + 1`` seconds
  pass (default cred_expire is 120 s); the config sets ``cred_expire=5`` and short scheduler
  intervals, so a requeued job restarts after ~10-15 s here.
* A requeued job's output file is truncated unless ``--open-mode=append`` is used.
* ``--gres=none`` clears a ``#SBATCH --gres=gpu:N`` line; ``--gres=`` (empty) is rejected.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

MARKER = "QLORA_SLURM_TEST_CLUSTER"
REQUIRED = ("slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
# Terminal states: wait_for() stops at these even if they were not asked for.
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
    "SPECIAL_EXIT",
    "REVOKED",
}


class SlurmError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _marked_pids(predicate) -> list[int]:
    """Pids whose environment holds MARKER=value with predicate(value) true (Linux /proc)."""
    out = []
    me = os.getpid()
    key = (MARKER + "=").encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(key):
                if predicate(item[len(key) :].decode(errors="replace")):
                    out.append(int(entry))
                break
    return out


def _kill_pids(pids: Iterable[int], grace: float = 5.0) -> None:
    pids = [p for p in pids if _pid_alive(p)]
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
        time.sleep(0.1)
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def _reap_stale_clusters() -> None:
    """Kill processes left by an earlier fixture whose pytest process is gone."""

    def stale(value: str) -> bool:
        owner = value.split(":", 1)[0]
        return owner.isdigit() and int(owner) != os.getpid() and not _pid_alive(int(owner))

    _kill_pids(_marked_pids(stale), grace=2.0)


def _parse_kv(text: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S*)", text))


class SlurmCluster:
    """A private slurmctld + slurmd + munged under ``root``; see the module docstring."""

    def __init__(self, root: Path, nodes: int = 1):
        self.root = Path(root)
        self.node_count = nodes
        self.nodenames: list[str] = []
        self.conf = self.root / "slurm.conf"
        self.logdir = self.root / "log"
        self.marker = f"{os.getpid()}:{self.root}"
        self.nodename = ""
        self.cpus = 0
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []

    # ------------------------------------------------------------------ environment
    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm commands and jobs: this cluster's SLURM_CONF, no inherited
        SLURM_*/SBATCH_*/SRUN_* variables, and this Python's bin dir first on PATH so that
        ``python`` inside jobs is the interpreter (venv) running the tests."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        env["SLURM_CONF"] = str(self.conf)
        env[MARKER] = self.marker
        bindir = os.path.dirname(sys.executable)
        path = env.get("PATH", "/usr/local/bin:/usr/bin:/bin")
        parts = [p for p in path.split(os.pathsep) if p]
        if not parts or parts[0] != bindir:
            parts.insert(0, bindir)
        # Daemons and jobs need the sbin dirs too (slurmd is often in /usr/sbin).
        for extra in ("/usr/sbin", "/sbin"):
            if extra not in parts:
                parts.append(extra)
        env["PATH"] = os.pathsep.join(parts)
        if sys.prefix != sys.base_prefix:
            env["VIRTUAL_ENV"] = sys.prefix
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def run(
        self,
        *cmd: str,
        check: bool = True,
        timeout: float = 30,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
    ) -> subprocess.CompletedProcess:
        full_env = self.env
        if env:
            full_env.update(env)
        res = subprocess.run(list(cmd), env=full_env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 40) -> None:
        info = subprocess.run(["slurmd", "-C"], env=self.env, capture_output=True, text=True, timeout=30)
        hw = _parse_kv(info.stdout.splitlines()[0] if info.stdout else "")
        if info.returncode != 0 or "NodeName" not in hw:
            raise SlurmError(f"slurmd -C failed: {info.stdout}{info.stderr}")
        self.nodename = hw["NodeName"]
        self.nodenames = [self.nodename] + [f"{self.nodename}-node{i}" for i in range(2, self.node_count + 1)]
        self.cpus = int(hw.get("CPUs", "1"))
        for d in ("munge", "state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        (self.root / "munge").chmod(0o755)
        for name in self.nodenames:
            (self.root / "spool" / f"slurmd-{name}").mkdir(exist_ok=True)

        # munge: a fresh private key and socket, so the system munge (if any) is not involved.
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(128))
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                f"--seed-file={self.root / 'munge' / 'munged.seed'}",
                f"--log-file={self.logdir / 'munged.log'}",
            ],
        )
        self._wait(lambda: self.munge_socket.exists(), 10, "munged socket")

        self._write_conf(hw)
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        for name in self.nodenames:
            self._spawn(self._slurmd(name), ["slurmd", "-D", "-N", name])

        def nodes_idle() -> bool:
            r = self.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=10)
            states = [state.rstrip("*") for state in r.stdout.split()]
            return r.returncode == 0 and states == ["idle"] * len(self.nodenames)

        self._wait(nodes_idle, timeout, "nodes idle in sinfo")

    def _slurmd(self, node: str) -> str:
        """The name under which the slurmd of `node` runs in `_procs` (and its stdout log)."""
        return "slurmd" if node == self.nodename else f"slurmd-{node}"

    def _write_conf(self, hw: Mapping[str, str]) -> None:
        r = self.root
        cpus = int(hw.get("CPUs", "1"))
        if cpus >= 2:
            keys = ("Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
            topo = " ".join(f"{k}={hw[k]}" for k in keys if k in hw)
            resources = f"CPUs={cpus} {topo}"
        else:  # a 1-CPU CI box: declare 2 CPUs (config_overrides below) so 2-rank jobs fit
            resources = "CPUs=2"
        resources += f" RealMemory={hw.get('RealMemory', '1000')} State=UNKNOWN"
        # Every node's slurmd runs on this machine and listens on its own port.
        nodes = [
            f"NodeName={name} NodeHostname={self.nodename} NodeAddr=127.0.0.1 Port={_free_port()} {resources}"
            for name in self.nodenames
        ]
        lines = [
            "ClusterName=qlora-test",
            f"SlurmctldHost={self.nodename}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also sets how long a requeued job waits before it may start again.
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/slurmd-%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.logdir / 'slurmctld.log'}",
            f"SlurmdLogFile={self.logdir / 'slurmd-%n.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"PlugStackConfig={r / 'plugstack.conf'}",
            "MailProg=/bin/true",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=bf_interval=1,sched_interval=2",
            "ReturnToService=2",
            "JobRequeue=1",
            "KillWait=5",
            "MinJobAge=600",
            "InactiveLimit=0",
            *nodes,
            f"PartitionName=test Nodes={','.join(self.nodenames)} Default=YES MaxTime=INFINITE State=UP",
        ]
        if cpus < 2:
            lines.append("SlurmdParameters=config_overrides")
        (r / "plugstack.conf").write_text("")
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.logdir / f"{name}.stdout", "ab")  # noqa: SIM115 (closed in stop())
        self._logs.append(log)
        self._procs[name] = subprocess.Popen(
            cmd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.root,
            start_new_session=True,
        )

    def _wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self._procs.items():
                if p.poll() is not None:
                    raise SlurmError(f"{name} exited with {p.returncode} while waiting for {what}\n{self.logs()}")
            if cond():
                return
            time.sleep(0.3)
        raise SlurmError(f"timed out after {timeout}s waiting for {what}\n{self.logs()}")

    def logs(self, lines: int = 15) -> str:
        out = []
        for f in sorted(self.logdir.glob("*")):
            try:
                tail = f.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            out.append(f"--- {f}\n" + "\n".join(tail))
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel jobs, stop the daemons this object started, kill their leftover processes."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            try:
                ids = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10).stdout.split()
                if ids:
                    self.run("scancel", "--full", *ids, check=False, timeout=10)
                    deadline = time.monotonic() + 15
                    while time.monotonic() < deadline:
                        if not self.run("squeue", "-h", "-o", "%i", check=False, timeout=10).stdout.split():
                            break
                        time.sleep(0.5)
            except (subprocess.SubprocessError, OSError):
                pass
        for name in [*map(self._slurmd, self.nodenames), "slurmctld", "munged"]:
            p = self._procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        # slurmstepd and job processes outlive slurmd; they all carry our marker.
        if sys.platform.startswith("linux"):
            _kill_pids(_marked_pids(lambda v: v == self.marker), grace=3.0)
        for log in self._logs:
            log.close()

    # ------------------------------------------------------------------ jobs
    def submit(
        self,
        script: str | os.PathLike,
        *args: str,
        sbatch_args: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
    ) -> str:
        """``sbatch --parsable [sbatch_args] script args...`` -> job id (str). The job inherits
        ``self.env`` updated with ``env`` (sbatch's default --export=ALL). ``cwd`` defaults to
        the script's directory and is the job's working directory."""
        cwd = Path(cwd) if cwd is not None else Path(script).resolve().parent
        res = self.run("sbatch", "--parsable", *sbatch_args, str(script), *args, env=env, cwd=cwd)
        return res.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        res = self.run("scontrol", "show", "job", "-o", str(job_id), check=False, timeout=10)
        if res.returncode != 0:
            raise SlurmError(f"scontrol show job {job_id}: {res.stderr.strip()}")
        return _parse_kv(res.stdout)

    def job_state(self, job_id: str) -> str:
        return self.job_info(job_id).get("JobState", "UNKNOWN")

    def wait_for(
        self, job_id: str, states: str | Iterable[str] = "COMPLETED", timeout: float = 60, poll: float = 0.5
    ) -> str:
        """Wait until the job is in one of ``states``; raise (with the job's output and the
        daemon logs) on timeout or when it reaches another terminal state."""
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while True:
            state = self.job_state(job_id)
            if state in wanted:
                return state
            if state in TERMINAL:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(poll)
        raise SlurmError(
            f"job {job_id} is {state}, wanted {sorted(wanted)} (timeout {timeout}s)\n"
            f"{self.job_info(job_id)}\n--- job output:\n{self.read_output(job_id)}\n{self.logs()}"
        )

    def wait_for_output(self, job_id: str, text: str, timeout: float = 30, poll: float = 0.3) -> str:
        """Wait until the job's output file contains ``text``; return the output."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.read_output(job_id)
            if text in out:
                return out
            state = self.job_state(job_id)
            if state in TERMINAL:
                break
            time.sleep(poll)
        raise SlurmError(
            f"{text!r} not in output of job {job_id} ({self.job_state(job_id)}):\n"
            f"{self.read_output(job_id)}\n{self.logs()}"
        )

    def output_path(self, job_id: str) -> Path:
        return Path(self.job_info(job_id)["StdOut"])

    def read_output(self, job_id: str) -> str:
        try:
            return self.output_path(job_id).read_text(errors="replace")
        except (OSError, KeyError, SlurmError):
            return ""

    def cancel(self, job_id: str, signal_name: str | None = None, *extra: str) -> None:
        """``scancel [--signal=SIG] [extra] job``; with a signal and no extra flags it reaches
        the tasks of the job steps (srun), not the batch shell."""
        args = [f"--signal={signal_name}"] if signal_name else []
        self.run("scancel", *args, *extra, str(job_id))


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "real-Slurm tests need Linux"
    if os.geteuid() != 0:
        return "real-Slurm tests start slurmd/slurmctld and need root"
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
    missing = [b for b in REQUIRED if shutil.which(b, path=path) is None]
    if missing:
        return f"Slurm/munge not installed (missing {', '.join(missing)}); run .ci/install-slurm.sh"
    return None


def _running_cluster(tmp_path_factory, nodes: int):
    """A started cluster of `nodes` nodes, stopped when the generator closes; skips (or fails) as the module
    docstring says."""
    reason = _skip_reason()
    if reason:
        if os.environ.get("QLORA_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    _reap_stale_clusters()
    root = tmp_path_factory.mktemp("slurm")
    if len(str(root)) > 60:  # unix socket paths are limited to ~107 bytes
        root = Path(tempfile.mkdtemp(prefix="qlora-slurm-"))
    cluster = SlurmCluster(root, nodes)
    try:
        cluster.start()
    except (SlurmError, OSError, subprocess.SubprocessError) as e:
        cluster.stop()
        if os.environ.get("QLORA_REQUIRE_SLURM") == "1":
            pytest.fail(f"Slurm daemons did not come up: {e}")
        pytest.skip(f"Slurm daemons did not come up: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session", name="slurm_cluster")
def slurm_cluster_fixture(tmp_path_factory):
    """A running private single-node Slurm cluster (see module docstring)."""
    yield from _running_cluster(tmp_path_factory, nodes=1)


@pytest.fixture(scope="module", name="two_node_slurm_cluster")
def two_node_slurm_cluster_fixture(tmp_path_factory):
    """A running private Slurm cluster of two nodes, both on this machine (see module docstring)."""
    yield from _running_cluster(tmp_path_factory, nodes=2)

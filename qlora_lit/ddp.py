"""DDP (`trainer.strategy: ddp`, and what `auto` picks for several devices): Lightning's DDPStrategy, with a failing
rank handled by qlora_lit.rank_watch instead of Lightning's process observer, the model wrapped on the default CUDA
stream, and its collective timeout explained.

Lightning's own launcher (one machine, `trainer.devices N` without srun or torchrun) watches the processes it starts
and, when one ends with an error, kills every process within 5 seconds, itself included, with SIGKILL and no word to
the user. Here the ranks' RankWatch says which rank failed and stops them first; the observer kills what is left
only 10 seconds later, as a last resort.

The timeout (Lightning's 30 minutes; `--trainer.strategy qlora_lit.ddp.QLoRADDPStrategy
--trainer.strategy.init_args.timeout 0:10:00` changes it) is how long ranks wait in a collective
for the slowest: longer than any rank may legitimately keep the others waiting (rank 0 tokenizing a large dataset
into the token cache while the others wait at Lightning's barrier, a slow shared filesystem while loading or
checkpointing). Over NCCL it is also how long GPUs would sit idle behind a dead or frozen rank, but RankWatch ends
those within `silence_s` (30 s); the timeout only still decides for a rank that is alive and stuck (a deadlock, a
hung GPU), after which NCCL's watchdog (TORCH_NCCL_ASYNC_ERROR_HANDLING, on by default) aborts the process.

The wrapping stream: Lightning 2.6.6 builds torch's DistributedDataParallel inside a new CUDA stream, the setup
torch's CUDA-graph notes ask for when a whole backward is captured. DDP's constructor creates each parameter's
AccumulateGrad node and keeps it; the node runs on the stream it was created on, so on a GPU every gradient then
accumulates on that side stream, after waiting for the backward's, and torch warns on every backward that this "may
incur unnecessary synchronization ... ensure that DDP initialization is performed under the same stream as subsequent
forwards". qlora_lit captures no CUDA graphs: it wraps on the default stream, as Lightning's fix does
(Lightning-AI/pytorch-lightning#21746, unreleased in 2.6.6; `_setup_model` can go once a release has it). On a CPU
both wrap without a stream, the same code. Lightning's own class stays one setting away:
`--trainer.strategy.class_path lightning.pytorch.strategies.DDPStrategy`.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext

import torch
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from torch.nn.parallel import DistributedDataParallel

OBSERVER_GRACE_S = 10.0


class PatientObserver(_ChildProcessObserver):
    """Lightning's observer of the processes its launcher started, waiting OBSERVER_GRACE_S before it kills them all
    (RankWatch has stopped them, with a message, by then; it kills only what would otherwise be left)."""

    def _terminate_all(self) -> None:
        time.sleep(OBSERVER_GRACE_S)
        super()._terminate_all()


class WatchedLauncher(_SubprocessScriptLauncher):
    """Lightning's launcher for processes on one machine, with the patient observer."""

    def launch(self, function, *args, trainer=None, **kwargs):
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            PatientObserver(main_pid=os.getpid(), child_processes=self.procs).start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)


def watched_launcher(strategy) -> None:
    """Give `strategy` (DDP or FSDP, after its own `_configure_launcher`) the watched launcher."""
    if type(strategy._launcher) is _SubprocessScriptLauncher:
        strategy._launcher = WatchedLauncher(strategy.cluster_environment, strategy.num_processes, strategy.num_nodes)


class QLoRADDPStrategy(DDPStrategy):
    """Lightning's DDPStrategy with the watched launcher, the model wrapped on the default stream (see the module)."""

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        watched_launcher(self)

    def _setup_model(self, model: torch.nn.Module) -> DistributedDataParallel:
        device_ids = self.determine_ddp_device_ids()
        stream = torch.cuda.stream(torch.cuda.default_stream()) if device_ids is not None else nullcontext()
        with stream:
            return DistributedDataParallel(module=model, device_ids=device_ids, **self._ddp_kwargs)


def register() -> None:
    """Make `ddp` (and `auto` with several devices, which picks it by that name) this strategy."""
    StrategyRegistry.register(
        "ddp", QLoRADDPStrategy, description="qlora_lit's DDP (qlora_lit/ddp.py)", override=True, start_method="popen"
    )

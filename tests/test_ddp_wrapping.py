"""qlora_lit's DDP (qlora_lit/ddp.py): what `strategy: ddp` and `auto` build under the CLI, and that its wrapping trains
exactly as Lightning's; on a GPU, without torch's AccumulateGrad stream warning that Lightning's side stream causes."""

from __future__ import annotations

import os
import warnings

import lightning as L
import pytest
import torch
from conftest import DEMO_CONFIG
from lightning.pytorch.strategies import DDPStrategy

from qlora_lit.cli import cli_main
from qlora_lit.ddp import QLoRADDPStrategy

STREAM_WARNING = "AccumulateGrad node's stream does not match"


@pytest.fixture(autouse=True)
def _no_launch_variables(monkeypatch):
    """No Slurm job or launch of the environment, and none left behind: Lightning writes MASTER_ADDR/PORT, and sets
    OMP_NUM_THREADS (and torch's threads) unless it is set."""
    launch = ["MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK"]
    for key in [key for key in os.environ if key.startswith("SLURM_")] + launch:
        monkeypatch.setenv(key, "")  # recorded, so the teardown restores the original state
        monkeypatch.delenv(key)
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))


@pytest.mark.parametrize(
    "setting, expected",
    [
        ("--trainer.strategy=ddp", QLoRADDPStrategy),
        ("--trainer.strategy=auto", QLoRADDPStrategy),  # Lightning's choice for two devices is `ddp`
        ("--trainer.strategy.class_path=lightning.pytorch.strategies.DDPStrategy", DDPStrategy),  # for comparisons
    ],
)
def test_the_cli_builds_ddp_that_wraps_on_the_default_stream(setting, expected):
    cli = cli_main(["--config", DEMO_CONFIG, "--trainer.devices", "2", setting], run=False)
    assert type(cli.trainer.strategy) is expected
    assert cli.trainer.strategy._start_method == "popen"


class Squares(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(16, 16)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.layer(batch).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(strategy: DDPStrategy, accelerator: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Four steps of one DDP process on `accelerator`: the trained weights and the warnings raised."""
    L.seed_everything(3)
    module = Squares()
    data = torch.utils.data.DataLoader(torch.randn(32, 16), batch_size=8)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        strategy=strategy,
        max_steps=4,
        accumulate_grad_batches=2,  # micro-batches without the all-reduce (no_sync), as base.yaml's runs have
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, data)
    finally:
        torch.distributed.destroy_process_group()  # Lightning leaves it; later tests must not see a world
    return {key: value.cpu() for key, value in module.layer.state_dict().items()}, [str(w.message) for w in caught]


def compare_wrappings(accelerator: str) -> tuple[list[str], list[str]]:
    lightning, lightning_warnings = fit(DDPStrategy(), accelerator)
    ours, our_warnings = fit(QLoRADDPStrategy(), accelerator)
    exact = {"rtol": 0, "atol": 0} if accelerator == "cpu" else {}  # GPU kernels need not repeat bit for bit
    for key, value in ours.items():
        torch.testing.assert_close(value, lightning[key], **exact, msg=key)
    assert not torch.equal(ours["weight"], Squares().layer.weight.cpu())  # it trained
    return lightning_warnings, our_warnings


def test_on_a_cpu_the_wrapping_trains_exactly_as_lightnings():
    compare_wrappings("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_gradients_accumulate_on_the_backwards_stream():
    lightning_warnings, our_warnings = compare_wrappings("cuda")
    assert not [text for text in our_warnings if STREAM_WARNING in text]
    # What the strategy is for: Lightning 2.6.6's side stream made torch warn (torch 2.11 on the H200s).
    assert [text for text in lightning_warnings if STREAM_WARNING in text] or L.__version__ != "2.6.6"

"""FSDP (configs/fsdp.yaml): the wrap policy, and a real two-process fit with fsdp.yaml's settings (bf16-mixed, 4-bit
weights in bf16 containers) under Lightning's FSDP machinery on CPUs (gloo; tests/fsdp_cpu.py lets the GPU-only
strategy run there): whole-adapter checkpoints, the adapter export, samples, and a resume that continues exactly
like the uninterrupted run."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from conftest import TINY_MODEL, checkpoint_at, fit_in_subprocess
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy
from peft import PeftModel
from runs import peft_key
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_sharded_load import free_port
from torch.distributed.fsdp import CPUOffload, FullyShardedDataParallel
from torch.distributed.fsdp._runtime_utils import _lazy_init
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers import AutoConfig, AutoModelForCausalLM
from zoo import COMMON, build_zoo_model

from qlora_lit.data.datamodule import load_tokenizer
from qlora_lit.errors import ConfigError
from qlora_lit.fsdp import (
    SHARDS_KEY,
    QLoRAFSDPStrategy,
    check_fsdp_strategy,
    fsdp_units,
    qlora_wrap_policy,
    trained_parameters,
    without_frozen_cpu_grads,
)
from qlora_lit.model import LoraArgs, QuantizationArgs, load_base_model
from qlora_lit.module import QLoRAModule
from qlora_lit.samples import DEFAULT_PROMPTS, greedy_answers
from qlora_lit.sharded_load import fsdp_handles
from qlora_lit.split_vocab import split_input_embeddings, split_output_head
from qlora_lit.text_log import as_prose

ROOT = Path(__file__).resolve().parents[1]
FSDP_CONFIG = str(ROOT / "configs" / "fsdp.yaml")
FSDP_CPU = ROOT / "tests" / "fsdp_cpu.py"
# r=64: the LoRA matrices reach bitsandbytes' 4096 elements, so the optimizer keeps 8-bit (blockwise) state.
RANK = 64
CPU_FSDP = ["--trainer.strategy.class_path", "fsdp_cpu.CPUFSDPStrategy", "--trainer.accelerator", "cpu"]
CPU_FSDP += ["--trainer.devices", "2", "--model.quantization.compute_dtype", "bfloat16"]  # fsdp.yaml's bf16 as is
CPU_FSDP += ["--model.lora.r", str(RANK), "--trainer.val_check_interval", "2", "--samples.max_new_tokens", "4"]


def tiny_module(compute_dtype: str = "float32", **settings) -> QLoRAModule:
    module = QLoRAModule(TINY_MODEL, quantization=QuantizationArgs(compute_dtype=compute_dtype), **settings)
    module.configure_model()
    return module


def test_fsdp_units_hold_the_frozen_base_and_the_adapters_stay_whole_on_every_rank():
    """FSDP flattens each unit's own parameters into one buffer: every decoder layer is a unit, the LoRA matrices are
    none (they are FSDP's ignored_states, replicated), so a unit holds frozen tensors only, and the ignored ones are
    exactly the trained ones."""
    model = tiny_module().model
    own = fsdp_units(model)
    units = [m for m in model.modules() if qlora_wrap_policy(m, recurse=False, nonwrapped_numel=0, own_units=own)]
    layers = model.get_base_model().model.layers
    assert all(layer in units for layer in layers)
    lora_matrices = [m for name, m in model.named_modules() if name.endswith((".lora_A.default", ".lora_B.default"))]
    assert lora_matrices and not any(m in units for m in lora_matrices)
    replicated = {id(p) for p in trained_parameters(model)}
    assert replicated == {id(p) for m in lora_matrices for p in m.parameters()}
    assert all(qlora_wrap_policy(m, recurse=True, nonwrapped_numel=0) for m in model.modules())
    for unit in [*units, model]:  # what FSDP flattens in a unit once its wrapped children are taken out
        inner = {id(p) for child in unit.modules() if child is not unit and child in units for p in child.parameters()}
        assert not any(p.requires_grad for p in unit.parameters() if id(p) not in inner | replicated)
    sharded_lora = [m for m in lora_matrices if qlora_wrap_policy(m, False, 0, lora_units=True)]
    assert sharded_lora == lora_matrices  # the alternative bench/fsdp_units.py times


def test_untied_embeddings_and_head_are_units_of_their_own_and_tied_ones_stay_together(tmp_path):
    """At 70B each is 2 GB: in the root unit both would stay gathered for the whole step. Tied, they are one tensor,
    which FSDP must keep in one unit."""
    tied = tiny_module().model
    layers = {id(layer) for layer in tied.get_base_model().model.layers}
    assert fsdp_units(tied) == layers  # the tiny model ties them
    untied = load_base_model(str(build_zoo_model("llama-untied", tmp_path)), QuantizationArgs(compute_dtype="float32"))
    units = fsdp_units(untied) - {id(layer) for layer in untied.model.layers}
    assert units == {id(untied.get_input_embeddings()), id(untied.get_output_embeddings())}
    assert all(
        qlora_wrap_policy(m, recurse=False, nonwrapped_numel=0, own_units=units)
        for m in untied.modules()
        if id(m) in units
    )


def test_layers_are_units_whatever_the_architecture_calls_them():
    """Polyglot-Ko's GPT-NeoX names its layers GPTNeoXLayer: found by transformers' _no_split_modules, they are units,
    and its untied head (embed_out) and embeddings (embed_in) larger than a layer are split (a name rule,
    "...DecoderLayer", found neither: the whole base was one unit). A model without _no_split_modules is refused
    under FSDP with the reason."""
    config = AutoConfig.for_model("gpt_neox", **{**COMMON, "tie_word_embeddings": False})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = list(model.gpt_neox.layers)
    assert {id(layer) for layer in layers} <= fsdp_units(model) and len(layers) == COMMON["num_hidden_layers"]
    split, embeddings = split_output_head(model), split_input_embeddings(model)
    assert split is not None and {id(piece) for piece in split.pieces} <= fsdp_units(model)
    assert embeddings is model.gpt_neox.embed_in and {id(piece) for piece in embeddings.pieces} <= fsdp_units(model)
    model._no_split_modules = None
    strategy = QLoRAFSDPStrategy(parallel_devices=[torch.device("cuda", 0)] * 2, auto_wrap_policy=qlora_wrap_policy)
    strategy._lightning_module = SimpleNamespace(model=model)
    with pytest.raises(ConfigError, match="no decoder layers found in GPTNeoXForCausalLM"):
        strategy.setup(trainer=None)


@pytest.mark.parametrize(
    ("devices", "accelerator", "message"),
    [(1, "cuda", "this run has one"), (2, "cpu", "FSDP runs on GPUs only, this run is on cpu")],
)
def test_fsdp_refuses_one_process_and_cpus(devices, accelerator, message):
    strategy = QLoRAFSDPStrategy(parallel_devices=[torch.device(accelerator, 0)] * devices)
    with pytest.raises(ConfigError, match=message):
        strategy.setup_environment()


def test_lightnings_own_fsdp_strategy_is_refused_with_the_one_to_use():
    module = QLoRAModule(TINY_MODEL, quantization=QuantizationArgs(compute_dtype="float32"))
    strategy = FSDPStrategy(parallel_devices=[torch.device("cpu")])
    module._trainer = SimpleNamespace(strategy=strategy, precision="32-true")
    with pytest.raises(ConfigError, match="qlora_lit.fsdp.QLoRAFSDPStrategy"):
        module.configure_model()


def test_predict_under_fsdp_is_refused_with_what_to_use():
    module = QLoRAModule(TINY_MODEL, quantization=QuantizationArgs(compute_dtype="float32"))
    module._trainer = SimpleNamespace(strategy=QLoRAFSDPStrategy(parallel_devices=[torch.device("cuda", 0)] * 2))
    with pytest.raises(ConfigError, match="predict does not run under FSDP"):
        module.on_predict_start()


def test_optimizer_state_is_saved_and_loaded_as_without_fsdp_and_the_old_sharded_form_is_named():
    environment = LightningEnvironment()
    environment.set_world_size(2)
    strategy = QLoRAFSDPStrategy(parallel_devices=[torch.device("cuda", 0)] * 2, cluster_environment=environment)
    weight = torch.zeros(3, requires_grad=True)
    trained = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    weight.grad = torch.ones(3)
    trained.step()
    saved = strategy.optimizer_state(trained)
    assert saved.keys() == {"state", "param_groups"}
    strategy.optimizers = [torch.optim.SGD([torch.zeros(3, requires_grad=True)], lr=0.1, momentum=0.9)]
    strategy.load_optimizer_state_dict({"optimizer_states": [saved]})
    assert torch.equal(strategy.optimizers[0].state_dict()["state"][0]["momentum_buffer"], torch.ones(3))
    with pytest.raises(ConfigError, match="per-rank shards of the adapters; it cannot be resumed"):
        strategy.load_optimizer_state_dict({"optimizer_states": [{SHARDS_KEY: [{}, {}]}]})


def test_bf16_mixed_under_fsdp_computes_in_bf16_and_leaves_buffers_as_they_are():
    """Lightning's bf16-mixed would cast every buffer to bf16, the rotary frequencies too."""
    strategy = QLoRAFSDPStrategy(
        parallel_devices=[torch.device("cuda", 0)] * 2, precision_plugin=FSDPPrecision("bf16-mixed")
    )
    config = strategy.mixed_precision_config
    assert config.param_dtype == torch.bfloat16 and config.buffer_dtype is None
    assert FSDPPrecision("bf16-mixed").mixed_precision_config.buffer_dtype == torch.bfloat16  # what it replaces


@pytest.mark.parametrize("dropped", [True, False])
def test_cpu_offload_pins_no_gradient_buffer_for_frozen_units(dropped, monkeypatch):
    """torch's FSDP gives every offloaded unit a pinned CPU gradient buffer the size of its shard at the first
    forward, frozen or not: as much pinned memory again as the base. Frozen units get one of the same size that
    holds one element, which torch's gradient reset after each forward accepts (it checks the size; an empty
    buffer failed there on a GPU). A CPU process cannot pin memory: pinning is a copy here, the rest is torch's."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *args, **kwargs: self.clone())
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    model[0].requires_grad_(False)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        wrapped = FullyShardedDataParallel(
            model,
            auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}),
            cpu_offload=CPUOffload(offload_params=True),
            device_id=torch.device("cpu"),
            use_orig_params=True,  # as Lightning wraps
        )
        if dropped:
            without_frozen_cpu_grads(wrapped)
        _lazy_init(wrapped, wrapped)  # what the first forward does first
        buffers = {}
        for handle in fsdp_handles(wrapped):
            buffers[handle.flat_param.requires_grad] = handle.flat_param._cpu_grad.untyped_storage().nbytes()
            handle._use_sharded_grad_views()  # what resharding after a forward does (it checks the buffer's size)
            assert all(p.grad is None for p in handle.flat_param._params if not p.requires_grad)
    finally:
        dist.destroy_process_group()
    assert buffers == {False: 4 if dropped else 72 * 4, True: 72 * 4}  # 8 x 8 weights + 8 biases, fp32


def test_cpu_offload_on_a_torch_without_the_hook_warns_and_runs_as_torch_does(monkeypatch):
    """`without_frozen_cpu_grads` relies on torch's private FlatParamHandle: where a torch lacks the method it wraps,
    the run goes on with torch's own buffers and says what that costs, instead of failing in setup."""
    from torch.distributed.fsdp._flat_param import FlatParamHandle

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    model[0].requires_grad_(False)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        wrapped = FullyShardedDataParallel(
            model, auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}), device_id=torch.device("cpu")
        )
        monkeypatch.delattr(FlatParamHandle, "init_flat_param_attributes")
        with pytest.warns(UserWarning, match="frozen units keep their pinned CPU gradient buffers"):
            without_frozen_cpu_grads(wrapped)
    finally:
        dist.destroy_process_group()


def test_a_checkpoint_of_an_earlier_sharded_form_is_named_wherever_it_is_resumed():
    module = QLoRAModule(TINY_MODEL, quantization=QuantizationArgs(compute_dtype="float32"))
    module._trainer = SimpleNamespace(strategy=object(), state=SimpleNamespace(fn="fit"))
    checkpoint = {"optimizer_states": [{SHARDS_KEY: [{}, {}]}], "state_dict": {}}
    with pytest.raises(ConfigError, match="saved under FSDP by an earlier qlora_lit"):
        module.on_load_checkpoint(checkpoint)


def fsdp_fit(folder: Path, *args: str) -> Path:
    """A demo fit on two CPU processes under FSDP; returns its run folder."""
    return fit_in_subprocess(folder, "--config", FSDP_CONFIG, *CPU_FSDP, *args, entry=(str(FSDP_CPU),))


# base.yaml's norm clipping (tighter, so that it acts on the tiny model), the gradient norm logged every step, and
# recomputed activations (lowmem.yaml) inside the FSDP units.
CLIPPED = ["--trainer.gradient_clip_val", "0.5", "--trainer.log_every_n_steps", "1"]
CLIPPED += ["--model.gradient_checkpointing", "true"]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    return fsdp_fit(tmp_path_factory.mktemp("fsdp") / "full", "--trainer.max_steps", "4", *CLIPPED)


@pytest.mark.slow
def test_fsdp_fit_saves_whole_adapters_and_resumes_like_the_uninterrupted_run(fsdp_run, tmp_path):
    run = fsdp_run
    assert "FSDP sharded loading: each rank read" in (run.parents[1] / "log.txt").read_text()  # unit by unit
    reference = tiny_module("bfloat16", lora=LoraArgs(r=RANK, alpha=16))  # the same adapters, unsharded
    shapes = {name: param.shape for name, param in reference.named_parameters() if param.requires_grad}

    final = checkpoint_at(run, 4)
    assert {key: value.shape for key, value in final["state_dict"].items()} == shapes  # whole, and the adapters only
    assert all(value.dtype == torch.float32 for value in final["state_dict"].values())  # bf16 compute, fp32 weights
    optimizer = final["optimizer_states"][0]  # as without FSDP: the adapters are whole on every rank
    assert len(optimizer["state"]) == len(shapes)
    states = [state.get("__bnb_optimizer_quant_state__", state)["state1"] for state in optimizer["state"].values()]
    assert any(state.dtype == torch.uint8 for state in states)  # bitsandbytes' blockwise 8-bit state

    # The exported adapter is the last checkpoint's, in PEFT's format: it loads onto the base as any adapter does.
    exported = load_file(run / "adapter" / "adapter_model.safetensors")
    assert len(exported) == len(shapes)
    for key, value in final["state_dict"].items():
        torch.testing.assert_close(exported[peft_key(key)], value, rtol=0, atol=0)
    base = load_base_model(TINY_MODEL, QuantizationArgs(compute_dtype="bfloat16"))
    loaded = PeftModel.from_pretrained(base, run / "adapter")
    for name, param in loaded.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(param, final["state_dict"][f"model.{name}"], rtol=0, atol=0)

    # Samples: every rank generated along; the untrained model's answers are the base model's.
    events = EventAccumulator(str(run), size_guidance={"tensors": 0})
    events.Reload()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        answers = greedy_answers(reference.model.eval(), load_tokenizer(TINY_MODEL), list(DEFAULT_PROMPTS), 4)
    for index, (prompt, answer) in enumerate(zip(DEFAULT_PROMPTS, answers, strict=True)):
        logged = events.Tensors(f"samples/{index}/text_summary")
        assert [event.step for event in logged] == [0, 2, 4]
        assert logged[0].tensor_proto.string_val[0].decode() == f"**{as_prose(prompt)}**\n\n{as_prose(answer.strip())}"

    # Resumed from step 2 (weights, 8-bit optimizer state, scheduler, data position, each rank's random stream):
    # it ends exactly where the uninterrupted run ended.
    ckpt = next((run / "checkpoints").glob("step000002-*.ckpt"))
    resumed = fsdp_fit(tmp_path / "resumed", "--trainer.max_steps", "4", *CLIPPED, "--ckpt_path", str(ckpt))
    for key, value in checkpoint_at(resumed, 4)["state_dict"].items():
        torch.testing.assert_close(value, final["state_dict"][key], rtol=0, atol=0, msg=key)


def scalars(run: Path, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(run))
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


@pytest.mark.slow
def test_fsdp_clips_by_norm_and_logs_the_norm_over_every_shard(fsdp_run, tmp_path):
    """base.yaml clips the gradient norm, which Lightning's FSDP precision refuses; under qlora_lit's FSDP the root
    module clips it (the run above trained), and train/grad_norm is the norm of the averaged gradient, as two DDP ranks
    see it in the first step (same weights, same batches), not one rank's own."""
    ddp = ["--config", FSDP_CONFIG, *CPU_FSDP, "--trainer.strategy", "ddp", "--trainer.max_steps", "1", *CLIPPED]
    replicated = scalars(fit_in_subprocess(tmp_path / "ddp", *ddp), "train/grad_norm")[0]  # fsdp.yaml's dtypes
    assert replicated > 0.5  # so the clipping acts
    assert scalars(fsdp_run, "train/grad_norm")[0] == pytest.approx(replicated, rel=0.01)


def test_fsdp_refuses_4bit_storage_other_than_the_compute_dtype_naming_the_setting():
    """fsdp.yaml stores the packed weights as bf16; with the fp16 of GPUs before Ampere, FSDP would fail to flatten a
    unit of bf16 weights and fp16 norms (`Must flatten tensors with uniform dtype`) after the model loaded."""
    strategy = QLoRAFSDPStrategy(parallel_devices=[torch.device("cuda", 0)] * 2)
    fp16 = QuantizationArgs(compute_dtype="float16", quant_storage="bfloat16")
    with pytest.raises(ConfigError, match="Add --model.quantization.quant_storage float16$"):
        check_fsdp_strategy(strategy, fp16, LoraArgs())
    check_fsdp_strategy(strategy, QuantizationArgs(compute_dtype="float16", quant_storage="float16"), LoraArgs())
    check_fsdp_strategy(strategy, QuantizationArgs(compute_dtype="bfloat16", quant_storage="bfloat16"), LoraArgs())
    check_fsdp_strategy(None, fp16, LoraArgs())  # without FSDP the storage is free


def test_fsdp_refuses_modules_trained_in_full():
    """The unit-by-unit loading makes LoRA's adapters only: `modules_to_save [lm_head]` stopped with a KeyError (a
    tied head) or an FSDP unit of two dtypes (an untied one), both seen on the CPU's FSDP."""
    strategy = QLoRAFSDPStrategy(parallel_devices=[torch.device("cuda", 0)] * 2)
    bf16 = QuantizationArgs(compute_dtype="bfloat16", quant_storage="bfloat16")
    with pytest.raises(ConfigError, match=r"lora.modules_to_save \['lm_head'\] cannot be trained under FSDP"):
        check_fsdp_strategy(strategy, bf16, LoraArgs(modules_to_save=["lm_head"]))
    check_fsdp_strategy(None, bf16, LoraArgs(modules_to_save=["lm_head"]))

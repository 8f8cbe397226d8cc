"""Checks made before any weight is read: GPUs before Ampere, the attention each architecture and device can take,
tokenizers larger than the embeddings, LoRA targets an architecture lacks, experts; generation never recompiles."""

from __future__ import annotations

from types import SimpleNamespace
from unittest.mock import Mock

import pytest
import torch
from conftest import TINY_MODEL
from torch._dynamo.testing import CompileCounter
from zoo import build_gemma3_with_vision, build_zoo_model, zoo_config

import qlora_lit.module
import qlora_lit.preflight
from qlora_lit.assets import resolve_asset
from qlora_lit.errors import ConfigError
from qlora_lit.model import LoraArgs, QuantizationArgs
from qlora_lit.module import QLoRAModule
from qlora_lit.preflight import (
    PRE_AMPERE_OVERRIDES,
    check_gpu_generation,
    check_packing,
    choose_attention,
    model_config,
)
from qlora_lit.samples import greedy_answers

BASE_YAML_LORA = LoraArgs(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"])
GPUS = {"Tesla V100-SXM2-16GB": (7, 0), "Tesla T4": (7, 5), "NVIDIA A100-SXM4-80GB": (8, 0), "NVIDIA H200": (9, 0)}


class ModelLoadReached(Exception):
    """The checks passed and configure_model went on to load the base."""


def on_a_fake_gpu(module: QLoRAModule, gpu: str, precision: str, monkeypatch) -> Mock:
    """Attach `module` to a stand-in trainer on CUDA device 0 of the kind `gpu`; returns the (stopped) loader."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args, **kwargs: GPUS[gpu])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args, **kwargs: gpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)  # what torch says on a T4
    module.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)), precision=precision)
    loader = Mock(side_effect=ModelLoadReached)
    monkeypatch.setattr(qlora_lit.module, "load_base_model", loader)
    return loader


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight_zoo")
    return lambda name, **sizes: str(build_zoo_model(name, root / f"{name}{len(sizes)}", **sizes))


@pytest.mark.parametrize("gpu", ["Tesla V100-SXM2-16GB", "Tesla T4"])
def test_base_yaml_on_a_gpu_before_ampere_stops_before_loading_and_names_the_overrides(gpu, monkeypatch):
    module = QLoRAModule(TINY_MODEL, QuantizationArgs(compute_dtype="bfloat16"), attn_implementation="auto")
    loader = on_a_fake_gpu(module, gpu, "bf16-mixed", monkeypatch)
    with pytest.raises(ConfigError) as error:
        module.configure_model()
    assert f"{gpu} (compute capability {GPUS[gpu][0]}.{GPUS[gpu][1]}) has no bf16" in str(error.value)
    assert PRE_AMPERE_OVERRIDES in str(error.value)
    assert "trainer.precision=bf16-mixed and model.quantization.compute_dtype=bfloat16" in str(error.value)
    loader.assert_not_called()


def test_under_fsdp_the_pre_ampere_message_names_the_4bit_storage_too(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args, **kwargs: GPUS["Tesla T4"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args, **kwargs: "Tesla T4")
    cuda = torch.device("cuda", 0)
    with pytest.raises(ConfigError) as error:
        check_gpu_generation(cuda, "bf16-mixed", "bfloat16", sharded=True)
    assert f"add {PRE_AMPERE_OVERRIDES} --model.quantization.quant_storage float16 (" in str(error.value)
    with pytest.raises(ConfigError, match=f"add {PRE_AMPERE_OVERRIDES} \\("):
        check_gpu_generation(cuda, "bf16-mixed", "bfloat16")


@pytest.mark.parametrize(("gpu", "attention"), [("Tesla T4", "sdpa"), ("NVIDIA A100-SXM4-80GB", "varlen")])
def test_with_the_overrides_auto_takes_an_attention_the_gpu_has(gpu, attention, monkeypatch):
    module = QLoRAModule(TINY_MODEL, QuantizationArgs(compute_dtype="float16"), attn_implementation="auto")
    loader = on_a_fake_gpu(module, gpu, "16-mixed", monkeypatch)
    with pytest.raises(ModelLoadReached):
        module.configure_model()
    assert loader.call_args.args[-1] == attention


@pytest.mark.parametrize("attention", ["varlen", "flash_attention_2", "flex_attention"])
def test_flash_kernels_on_a_gpu_before_ampere_are_refused(attention, monkeypatch):
    module = QLoRAModule(TINY_MODEL, QuantizationArgs(compute_dtype="float16"), attn_implementation=attention)
    on_a_fake_gpu(module, "Tesla T4", "16-mixed", monkeypatch)
    with pytest.raises(ConfigError, match=f"attn_implementation={attention} needs an Ampere or newer GPU; Tesla T4"):
        module.configure_model()


def test_soft_capped_gemma2_takes_eager_attention_on_cpus_and_gpus(zoo, monkeypatch):
    config = model_config(zoo("gemma2"))
    assert choose_attention("auto", config, torch.device("cpu")) == "eager"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args, **kwargs: (9, 0))
    assert choose_attention("auto", config, torch.device("cuda", 0)) == "eager"
    assert choose_attention("auto", model_config(zoo("mistral")), torch.device("cuda", 0)) == "varlen"


def test_the_memory_estimate_sees_gemma2s_eager_attention_and_its_own_loss(zoo, monkeypatch):
    """What `gradient_checkpointing: auto` judges by: eager attention keeps whole score matrices, and a model that
    soft-caps its logits keeps its own loss over every position."""
    module = QLoRAModule(zoo("gemma2"), QuantizationArgs(compute_dtype="float32"), attn_implementation="auto")
    module.configure_model()
    monkeypatch.setattr(module, "micro_batch_tokens", lambda: 4096)
    batch = module.micro_batch(module.model.get_base_model())
    assert (batch.rows, batch.width, batch.eager_attention, batch.labelled_loss) == (1, 4096, True, False)
    llama = QLoRAModule(TINY_MODEL, QuantizationArgs(compute_dtype="float32"), attn_implementation="sdpa")
    llama.configure_model()
    monkeypatch.setattr(llama, "micro_batch_tokens", lambda: 4096)
    batch = llama.micro_batch(llama.model.get_base_model())
    assert (batch.eager_attention, batch.labelled_loss) == (False, True)


def test_a_tokenizer_larger_than_the_embeddings_stops_before_loading(zoo, tokenizer):
    """Qwen2's tokenizer class adds <|endoftext|> (id 2048) to the tiny Llama's 2048 tokens; it would be the pad
    token, and the first padded batch would index past the embeddings."""
    module = QLoRAModule(zoo("qwen2", vocab_size=2048), QuantizationArgs(compute_dtype="float32"))
    from qlora_lit.data.datamodule import load_tokenizer

    module.trainer = SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
        precision="32-true",
        datamodule=SimpleNamespace(tokenizer=load_tokenizer(module.model_name_or_path)),
    )
    with pytest.raises(ConfigError, match="the tokenizer has 2049 tokens, but .* has embeddings for 2048"):
        module.configure_model()
    assert module.model is None


def configure_on_cpu(path: str, lora: LoraArgs) -> QLoRAModule:
    module = QLoRAModule(path, QuantizationArgs(compute_dtype="float32"), lora)
    module.configure_model()
    return module


def test_an_architecture_without_the_llama_projections_is_told_its_own_names(zoo):
    with pytest.raises(ConfigError) as error:
        configure_on_cpu(zoo("gpt_neox"), BASE_YAML_LORA)
    message = str(error.value)
    assert (
        "this gpt_neox model has the linear layers ['dense', 'dense_4h_to_h', 'dense_h_to_4h', 'query_key_value']"
        in message
    )
    assert "lm_head" not in message


def test_moe_experts_need_dropout_0_and_are_described_when_trained(zoo, capsys, caplog):
    path = zoo("qwen3_moe")
    with pytest.raises(ConfigError, match="fused tensors, which peft adapts only without dropout: set lora.dropout 0"):
        configure_on_cpu(path, LoraArgs(dropout=0.05))
    with pytest.raises(ConfigError, match="its experts are fused tensors, not linear layers"):
        configure_on_cpu(path, BASE_YAML_LORA)
    module = configure_on_cpu(path, LoraArgs(dropout=0.0))
    trained = [name for name, param in module.named_parameters() if param.requires_grad]
    assert any("experts" in name for name in trained)
    experts = sum(p.numel() for n, p in module.named_parameters() if "experts" in n and p.dim() == 3)
    logged = capsys.readouterr().err + caplog.text
    assert f"qwen3_moe: its experts are fused tensors that bitsandbytes does not quantize: {experts:,} parameters" in (
        logged
    )


def test_generation_never_compiles_the_training_layers(tokenizer):
    """Compiled layers (model.compile) run eagerly in samples and generate; outside, they do compile (the test
    could see a compilation)."""
    module = configure_on_cpu(resolve_asset(TINY_MODEL), LoraArgs())
    counter = CompileCounter()
    for layer in module.model.get_base_model().model.layers:
        layer.compile(backend=counter, dynamic=True)
    module.eval()
    greedy_answers(module.model, tokenizer, ["안녕?", "한국의 수도는?"], max_new_tokens=3)
    assert counter.frame_count == 0
    with torch.no_grad():
        module(torch.tensor([[5, 6, 7]]))
    assert counter.frame_count > 0


@pytest.mark.parametrize(("longest", "attention"), [(96, "sdpa"), (16, "varlen")])
def test_a_sliding_window_that_binds_avoids_a_varlen_kernel_without_windows(zoo, longest, attention, monkeypatch):
    """torch 2.11's varlen kernel is causal only: auto takes sdpa when examples are longer than the window."""
    monkeypatch.setattr(qlora_lit.preflight, "varlen_has_window", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args, **kwargs: (9, 0))
    config = model_config(zoo("mistral"))
    assert choose_attention("auto", config, torch.device("cuda", 0), longest_example=longest) == attention


HYBRIDS = {  # tiny configs of the hybrid architectures: attention beside Mamba, gated delta nets or convolutions
    "granitemoehybrid": {
        "layer_types": ["mamba", "attention"],
        "mamba_d_head": 16,
        "mamba_n_heads": 8,
        "mamba_d_state": 16,
        "mamba_n_groups": 1,
        "num_local_experts": 0,
        "shared_intermediate_size": 128,
    },
    "lfm2": {"layer_types": ["conv", "full_attention"], "block_dim": 64, "block_ff_dim": 128},
    "qwen3_next": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32,
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "full_attention_interval": 2,
    },
    "falcon_h1": {"mamba_d_ssm": 64, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 16, "mamba_n_groups": 1},
    "mamba": {},
    "rwkv": {},
}


def hybrid_config(name: str):
    from transformers import AutoConfig

    sizes = {"vocab_size": 2112, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
    sizes |= {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    return AutoConfig.for_model(name, **sizes, **HYBRIDS[name])


@pytest.mark.parametrize("name", list(HYBRIDS))
def test_packing_is_refused_for_layers_that_carry_a_state_along_the_row(name):
    config = hybrid_config(name)
    with pytest.raises(ConfigError, match=rf"data.pack_length=256 packs .* {name} cannot keep apart: its .* layers"):
        check_packing(config, 256)
    check_packing(config, None)  # padded batches: each example on its own
    check_packing(config, 0)


@pytest.mark.parametrize("name", ["llama", "gemma3_text", "mistral", "gpt_neox", "qwen3_moe", "exaone4"])
def test_packing_is_allowed_where_every_layer_is_attention(name):
    check_packing(zoo_config(name), 256)


def test_a_hybrid_model_stops_before_loading_when_the_data_are_packed(tmp_path, monkeypatch):
    hybrid_config("lfm2").save_pretrained(tmp_path)
    module = QLoRAModule(str(tmp_path), QuantizationArgs(compute_dtype="float32"))
    loader = Mock(side_effect=ModelLoadReached)
    monkeypatch.setattr(qlora_lit.module, "load_base_model", loader)
    data = SimpleNamespace(pack_length=2048, max_length=512, batch_size=1, tokenizer=None)
    module.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), precision="32-true")
    module.trainer.datamodule = data
    with pytest.raises(ConfigError, match="data.pack_length=2048 packs several examples into each row, which lfm2"):
        module.configure_model()
    loader.assert_not_called()
    data.pack_length = None
    with pytest.raises(ModelLoadReached):
        module.configure_model()


def test_why_packing_is_refused_a_mamba_layer_passes_one_examples_state_to_the_next():
    """The refusal's reason, pinned: transformers' Mamba layers read neither position ids nor sequence starts, so in a
    packed row the second example's logits depend on the first. If this fails, the library keeps packed examples
    apart itself, and check_packing may let such models pack."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hybrid_config("granitemoehybrid"), attn_implementation="sdpa").eval()
    first, second = torch.randint(3, 2000, (1, 12)), torch.randint(3, 2000, (1, 9))
    row = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(12), torch.arange(9)]).unsqueeze(0)
    with torch.no_grad():
        packed = model(input_ids=row, position_ids=positions).logits[:, 12:]
        alone = model(input_ids=second).logits
    assert (packed - alone).abs().max() > 1e-2


@pytest.mark.parametrize("targets", [BASE_YAML_LORA.target_modules, "all-linear"])
def test_a_vision_tower_beside_the_language_model_gets_no_adapters(targets, tmp_path, caplog):
    """Gemma 3 4B+ loads with a SigLIP tower whose q/k/v_proj and fc1/fc2 match LoRA's targets; adapters there get no
    gradient from text (DDP stopped at its second step: parameters that were not used in producing the loss)."""
    path = str(build_gemma3_with_vision(tmp_path / "gemma3"))
    lora = LoraArgs(r=4, dropout=0.0, target_modules=targets)
    module = QLoRAModule(path, QuantizationArgs(compute_dtype="float32"), lora, attn_implementation="eager")
    with caplog.at_level("INFO"):
        module.configure_model()
    assert "experts" not in caplog.text  # the tower's 3-D pooling probe is no mixture of experts
    trained = {name: param for name, param in module.model.named_parameters() if param.requires_grad}
    assert trained and not [name for name in trained if "vision_tower" in name or "multi_modal_projector" in name]
    assert any("language_model.layers.1.self_attn.q_proj.lora_A" in name for name in trained)
    ids = torch.randint(3, 2000, (2, 16))
    module.model.train()
    module.loss_sum({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})[0].backward()
    assert [name for name, param in trained.items() if param.grad is None] == []

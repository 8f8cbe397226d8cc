"""export: the adapter merged into the full-precision base, saved as a plain Hugging Face model folder."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import TINY_MODEL
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora_lit.assets import resolve_asset
from qlora_lit.cli import cli_main
from qlora_lit.data.inference import encode_prompts, left_pad
from qlora_lit.export import CHECK_ROWS, export
from qlora_lit.model import LoraArgs, QuantizationArgs
from qlora_lit.module import QLoRAModule


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["qlora_lit"])


@pytest.fixture(scope="module")
def merged(trained_run, tmp_path_factory):
    output = tmp_path_factory.mktemp("export") / "merged"
    adapter = str(trained_run[0] / "adapter")
    difference = cli_main(["export", "--adapter", adapter, "--output", str(output), "--dtype", "fp32"])
    return output, difference


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


def test_merged_folder_loads_in_plain_transformers_with_the_adapters_logits(trained_run, merged, tokenizer):
    output, reported = merged
    config = json.loads((output / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(output).eval()
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert AutoTokenizer.from_pretrained(output).eos_token_id == tokenizer.eos_token_id
    base = AutoModelForCausalLM.from_pretrained(resolve_asset(TINY_MODEL), dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, str(trained_run[0] / "adapter")).eval()
    batch = left_pad(tokenizer, encode_prompts(tokenizer, CHECK_ROWS))
    with torch.no_grad():
        got = model(**batch).logits
        torch.testing.assert_close(got, with_adapter(**batch).logits, rtol=1e-4, atol=1e-4)
        trained = trained_run[1](batch["input_ids"], batch["attention_mask"]).logits  # the NF4 model of training
    assert reported < 1e-4
    # Looser: training saw NF4-rounded base weights; on this random tiny model that is about 20% of the logits.
    assert relative_error(got, trained) < 0.3


def test_bf16_export_stores_bf16_weights(trained_run, tmp_path):
    output = tmp_path / "merged"
    difference = cli_main(["export", "--adapter", str(trained_run[0] / "adapter"), "--output", str(output)])
    with safe_open(output / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(key).dtype for key in weights.keys()} == {torch.bfloat16}  # noqa: SIM118
    assert difference < 1.0  # bf16 rounding of the merged weights and of the logits themselves


def test_export_refuses_a_non_empty_output_and_a_missing_adapter(trained_run, merged, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export", "--adapter", str(trained_run[0] / "adapter"), "--output", str(merged[0])])
    assert exit_info.value.code == 2
    assert "is a folder that is not empty; choose another, or --overwrite true" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["export", "--adapter", str(merged[0] / "nowhere"), "--output", str(merged[0] / "x")])
    assert "does not exist" in capsys.readouterr().err


def test_an_output_that_is_a_file_is_refused_even_with_overwrite(tmp_path, capsys):
    """It said "choose another or --overwrite" to a command that had --overwrite true."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    save_file({}, adapter / "adapter_model.safetensors")  # whole, and nothing in it
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:  # refused before anything loads: this adapter would not
        cli_main(["export", "--adapter", str(adapter), "--output", str(tmp_path / "notes.txt"), "--overwrite", "true"])
    assert exit_info.value.code == 2
    assert "notes.txt' is a file: a merged model is a folder of files; name a folder" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_adapted_head_tied_to_the_embeddings_is_untied_in_the_merged_model(tmp_path):
    """The tiny Llama ties its head to the input embeddings (as Llama 3.2 1B/3B, Qwen2.5, Gemma): merging LoRA on the
    head into the shared weight changed the input embeddings too (logits 2.5 apart after reloading)."""
    lora = LoraArgs(r=4, dropout=0.0, target_modules=["q_proj", "v_proj", "lm_head"])
    module = QLoRAModule(TINY_MODEL, QuantizationArgs(compute_dtype="float32"), lora)
    module.configure_model()
    torch.manual_seed(1)
    with torch.no_grad():
        for param in module.model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    module.model.save_pretrained(tmp_path / "adapter")
    difference = export(str(tmp_path / "adapter"), str(tmp_path / "merged"), dtype="fp32", device="cpu")
    assert difference < 1e-4
    base = AutoModelForCausalLM.from_pretrained(resolve_asset(TINY_MODEL), dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert not merged.config.tie_word_embeddings
    torch.testing.assert_close(merged.get_input_embeddings().weight, base.get_input_embeddings().weight)
    reference = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = torch.tensor([[5, 17, 200, 33, 900, 12]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)

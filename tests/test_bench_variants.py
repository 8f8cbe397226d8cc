"""The benchmark's base.yaml variants run what configs/base.yaml configures (a key added to base.yaml and not to the
bench would leave its rows measuring something else, as keep_dequantized once did)."""

from __future__ import annotations

from pathlib import Path

import yaml

from bench.run_qlora_lit import VARIANTS

REPO = Path(__file__).resolve().parents[1]


def test_base_as_configured_is_base_yaml():
    config = yaml.safe_load((REPO / "configs" / "base.yaml").read_text())
    model, data, trainer = config["model"], config["data"], config["trainer"]
    variant = VARIANTS["base-as-configured"]
    assert variant["pack"] == data["pack_length"] and variant["batch"] == data["batch_size"]
    assert variant["accum"] == trainer["accumulate_grad_batches"]
    assert variant["gc"] == model["gradient_checkpointing"] and variant["keep"] == model["keep_dequantized"]
    assert variant["compile"] == model["compile"] and variant["chunk"] == model["loss_chunk_tokens"]
    assert variant["upcast"] == model["upcast_to_fp32"]
    assert model["attn_implementation"] == "auto" and variant["attn"] == "varlen"  # what auto picks on Ampere+ GPUs
    for name in ("base", "base-b2", "base-cli", "base-b2-cli"):  # the same settings, more examples per step
        assert {k: v for k, v in VARIANTS[name].items() if k not in ("accum", "batch", "cli")} == {
            k: v for k, v in variant.items() if k not in ("accum", "batch")
        }, name


def test_the_lowmem_variants_are_lowmem_yaml_over_base_yaml():
    lowmem = yaml.safe_load((REPO / "configs" / "lowmem.yaml").read_text())
    assert set(lowmem) == {"model"}, "lowmem.yaml sets more than model keys: the variant below misses them"
    renamed = {"gradient_checkpointing": "gc", "loss_chunk_tokens": "chunk"}
    assert set(lowmem["model"]) <= set(renamed), f"lowmem.yaml keys the bench does not map: {set(lowmem['model'])}"
    settings = {renamed[k]: v for k, v in lowmem["model"].items()}
    assert VARIANTS["lowmem-as-configured"] == {**VARIANTS["base-as-configured"], **settings}
    assert VARIANTS["base-lowmem"] == {**VARIANTS["base"], **settings}  # more examples per step, as `base`

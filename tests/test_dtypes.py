"""One mapping between the dtype names of the YAML settings (bfloat16) and the flags of the plain commands (bf16)."""

from __future__ import annotations

from typing import get_args

import pytest
import torch

from qlora_lit.dtypes import FLAG_NAMES, DTypeFlag, DTypeName, dtype_name, to_dtype
from qlora_lit.generate import resolve_dtype


def test_every_flag_names_a_yaml_dtype_and_both_spellings_give_the_same_torch_dtype():
    assert set(FLAG_NAMES) == set(get_args(DTypeFlag))
    assert sorted(FLAG_NAMES.values()) == sorted(get_args(DTypeName))
    for flag, name in FLAG_NAMES.items():
        assert dtype_name(flag) == dtype_name(name) == name
        assert to_dtype(flag) is to_dtype(name) is getattr(torch, name)


def test_generate_and_export_flags_resolve_to_the_yaml_names():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == "float32"
    assert [resolve_dtype(flag, cpu) for flag in ("bf16", "fp16", "fp32")] == ["bfloat16", "float16", "float32"]


@pytest.mark.parametrize(("capability", "chosen"), [((7, 0), "float16"), ((7, 5), "float16"), ((8, 0), "bfloat16")])
def test_auto_takes_fp16_on_gpus_without_bf16_although_torch_counts_emulation(capability, chosen, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args, **kwargs: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)  # what torch says on a T4
    assert resolve_dtype("auto", torch.device("cuda", 0)) == chosen
    assert resolve_dtype("fp32", torch.device("cuda", 0)) == "float32"

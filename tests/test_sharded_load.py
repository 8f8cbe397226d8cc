"""FSDP loads the base one unit at a time (qlora_lit/sharded_load.py): the model it builds is the one
`from_pretrained` loads, for bf16 and pre-quantized 4-bit folders, and under FSDP no rank ever holds the whole base.
The FSDP fits of tests/test_fsdp.py (train, checkpoint, resume, export) go through the same loader."""

from __future__ import annotations

import functools
import os
import re
import shutil
import socket
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY_MODEL
from zoo import build_zoo_model

from qlora_lit.errors import ConfigError
from qlora_lit.model import LoraArgs, QuantizationArgs, attach_lora, load_base_model, lora_a_init
from qlora_lit.preflight import model_config
from qlora_lit.sharded_load import (
    SafetensorsCheckpoint,
    ShardedLoader,
    base_bytes,
    checkpoint_folder,
    empty_model,
    fsdp_handles,
    materialize,
    missing_tensors,
    prequantized_settings,
)
from qlora_lit.split_vocab import split_input_embeddings, split_output_head

QUANTIZATION = QuantizationArgs(compute_dtype="bfloat16", quant_storage="bfloat16")  # fsdp.yaml's
LORA = LoraArgs(r=4, dropout=0.0)
TOKENS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def empty_peft_model(path: str, quantization: QuantizationArgs = QUANTIZATION, gradient_checkpointing: bool = False):
    config = model_config(path)
    saved = prequantized_settings(config)
    settings = {
        "quant_type": saved["bnb_4bit_quant_type"] if saved else quantization.quant_type,
        "double_quant": saved["bnb_4bit_use_double_quant"] if saved else quantization.double_quant,
        "storage": torch.bfloat16,
    }
    base = empty_model(config, torch.bfloat16, "sdpa", settings)
    checkpoint = SafetensorsCheckpoint(checkpoint_folder(path))
    assert missing_tensors(base, checkpoint) == []
    return attach_lora(base, LORA, gradient_checkpointing, upcast_to_fp32=False), checkpoint


def whole_peft_model(path: str):
    return attach_lora(load_base_model(path, QUANTIZATION), LORA, gradient_checkpointing=False, upcast_to_fp32=False)


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """Packed 4-bit weights in bf16 containers (fsdp.yaml's; a pre-quantized folder keeps its uint8) hold NaN bit
    patterns: compare the bytes."""
    return tensor.contiguous().view(torch.uint8).reshape(-1)


def vocabulary_tokens(model) -> torch.Tensor:
    """Tokens from the whole vocabulary (every piece of split embeddings is looked up)."""
    rows = model.get_base_model().config.vocab_size
    return torch.randint(0, rows, (2, 24), generator=torch.Generator().manual_seed(0))


def logits(model, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


@pytest.fixture(scope="module")
def prequantized_folder(tmp_path_factory) -> Path:
    """The tiny model saved as a pre-quantized 4-bit folder, as `*-bnb-4bit` folders on the hub are."""
    folder = tmp_path_factory.mktemp("tiny-bnb-4bit")
    load_base_model(TINY_MODEL, QuantizationArgs(compute_dtype="bfloat16")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory) -> Path:
    """Eight decoder layers that outweigh the (untied) embeddings: one unit is a small part of the whole."""
    sizes = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 8}
    return build_zoo_model("llama-untied", tmp_path_factory.mktemp("deep"), vocab_size=256, **sizes)


@pytest.fixture(scope="module")
def wide_vocab_model(tmp_path_factory) -> Path:
    """As `deep_model`, with an output head (1024 x 128 in bf16) larger than a 4-bit decoder layer: FSDP splits it."""
    sizes = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 8}
    return build_zoo_model("llama-untied", tmp_path_factory.mktemp("wide"), vocab_size=1024, **sizes)


@pytest.mark.parametrize("source", ["bf16", "prequantized"])
def test_a_base_loaded_unit_by_unit_is_the_one_from_pretrained_loads(source, prequantized_folder):
    path = TINY_MODEL if source == "bf16" else str(prequantized_folder)
    torch.manual_seed(7)
    whole = whole_peft_model(path)
    torch.manual_seed(7)
    model, checkpoint = empty_peft_model(path)
    assert model.get_nb_trainable_parameters() == whole.get_nb_trainable_parameters()  # what the run reports
    materialize(model, ShardedLoader(model, checkpoint, torch.device("cpu"), torch.initial_seed()))

    assert not any(tensor.is_meta for tensor in [*model.parameters(), *model.buffers()])
    expected = whole.state_dict()
    for key, value in model.state_dict().items():  # packed 4-bit weights, quantization state, norms, LoRA
        assert torch.equal(as_bytes(value), as_bytes(expected[key])), key
    assert model.get_base_model().lm_head.weight is model.get_base_model().model.embed_tokens.weight  # still tied
    torch.testing.assert_close(logits(model), logits(whole), rtol=0, atol=0)


def test_split_embeddings_train_as_the_whole_ones(wide_vocab_model):
    """The embeddings in pieces (as under FSDP) give the whole model's loss and LoRA gradients bit for bit, for tokens
    from every piece, with gradient checkpointing: the hook that makes the embeddings' output need a gradient moved
    to the split embeddings with them. (The split head's logits are the same; its gradients differ by bf16 rounding,
    the pieces' products being summed one by one: about 2% of a gradient's largest value here.)"""

    def loss_and_grads(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapters count
                param.data = torch.full_like(param, 0.01)
        model.train()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    torch.manual_seed(7)
    whole = attach_lora(load_base_model(str(wide_vocab_model), QUANTIZATION), LORA, True, upcast_to_fp32=False)
    torch.manual_seed(7)
    model, checkpoint = empty_peft_model(str(wide_vocab_model), gradient_checkpointing=True)
    embeddings = split_input_embeddings(model)
    assert embeddings is not None and len(embeddings.pieces) > 1
    materialize(model, ShardedLoader(model, checkpoint, torch.device("cpu"), torch.initial_seed()))
    tokens = vocabulary_tokens(model)
    assert len({piece_of(embeddings, token) for token in tokens.flatten().tolist()}) == len(embeddings.pieces)
    assert embeddings(tokens).requires_grad  # the checkpointing hook, kept
    expected_loss, expected = loss_and_grads(whole)
    loss, grads = loss_and_grads(model)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    assert grads.keys() == expected.keys() and len(grads) == 2 * 7 * 8  # A and B of 7 projections in 8 layers
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)
    generated = []
    for each in (whole, model):  # the samples' greedy generation
        each.eval()
        with torch.no_grad():
            generated.append(each.generate(input_ids=tokens[:, :8], max_new_tokens=4, do_sample=False))
    assert torch.equal(*generated)


def piece_of(split, token: int) -> int:
    return next(i for i, piece in enumerate(split.pieces) if piece.vocab_rows[0] <= token < piece.vocab_rows[1])


def test_the_benchs_pre_quantized_folder_has_the_shapes_of_the_model_it_stands_for(tmp_path, monkeypatch):
    """bench/prequantized.py writes a pre-quantized folder module by module (the 70B run's base): each 4-bit weight is
    its layer's whole weight, packed (it once quantized the packed shape again: half the bytes, a 1 x N weight that
    failed at the first matmul), and the folder loads as from_pretrained loads any `*-bnb-4bit` folder."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    from bench.prequantized import build

    build("tiny", tmp_path / "model", "cpu")
    model = whole_peft_model(str(tmp_path / "model")).get_base_model()
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    for layer in layers:
        assert tuple(layer.weight.quant_state.shape) == (layer.out_features, layer.in_features)
        assert layer.weight.numel() * layer.weight.element_size() * 2 == layer.out_features * layer.in_features
    assert torch.isfinite(logits(model)).all()


def test_tensors_stored_under_other_names_are_found_before_loading(tmp_path):
    """transformers renames some checkpoints' tensors as it loads them (here: fused mixture-of-experts weights); FSDP
    then loads that base whole on each rank, as before, and the strategy says so."""
    folder = build_zoo_model("qwen3_moe", tmp_path / "moe")
    base = empty_model(model_config(str(folder)), torch.bfloat16, "sdpa", None)
    assert missing_tensors(base, SafetensorsCheckpoint(folder))


def split_in_two_shards(folder: Path) -> None:
    """The tiny model's weights as a two-file checkpoint with an index, as large models are published."""
    import json

    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({key: tensors[key] for key in keys}, folder / file, metadata={"format": "pt"})
    weight_map = {key: file for file, keys in shards.items() for key in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def cut_the_second_shard(folder: Path) -> None:
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


DAMAGES = {
    "a shard cut short": (cut_the_second_shard, "model-00002-of-00002.safetensors is cut short ("),
    "a shard missing": (lambda folder: (folder / "model-00001-of-00002.safetensors").unlink(), "lacks: model-00001"),
    "the index not JSON": (
        lambda folder: (folder / "model.safetensors.index.json").write_text('{"weight_map": '),
        "model.safetensors.index.json is no safetensors index",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_checkpoint_folder_copied_halfway_is_named_before_any_unit_loads(damage, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(checkpoint_folder(TINY_MODEL), folder)
    split_in_two_shards(folder)
    assert len(SafetensorsCheckpoint(folder).files) > 2  # whole, it reads
    spoil, message = DAMAGES[damage]
    spoil(folder)
    with pytest.raises(ConfigError, match=re.escape(message)):
        SafetensorsCheckpoint(folder)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wrap_and_report(rank: int, world_size: int, port: int, path: str, results: dict) -> None:
    """One FSDP rank: the empty model, wrapped with fsdp.yaml's policy and the loader as param_init_fn."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from qlora_lit.fsdp import fsdp_units, qlora_wrap_policy, trained_parameters

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    model, checkpoint = empty_peft_model(path)
    whole, embeddings = base_bytes(model), base_bytes(model.get_base_model().get_input_embeddings())
    split = split_output_head(model)  # as the strategy: the head in pieces of a layer's size, where it is larger
    split_embeddings = split_input_embeddings(model)  # and the embeddings
    tokens = vocabulary_tokens(model)
    loader = ShardedLoader(model, checkpoint, torch.device("cpu"), seed=7)
    loader.make_adapters()  # as the strategy: the adapters whole, left out of FSDP; the base loaded unit by unit
    wrapped = FullyShardedDataParallel(
        model,
        auto_wrap_policy=functools.partial(qlora_wrap_policy, own_units=fsdp_units(model)),
        ignored_states=trained_parameters(model),
        param_init_fn=loader,
        device_id=torch.device("cpu"),
        use_orig_params=True,
    )
    frozen = [handle.flat_param for handle in fsdp_handles(wrapped) if not handle.flat_param.requires_grad]
    results[rank] = {
        "whole": whole,
        "loaded": loader.loaded_bytes,
        "peak": loader.peak_unsharded_bytes,
        "local": sum(flat.numel() * flat.element_size() for flat in frozen),
        "logits": logits(wrapped, tokens),
        "head_pieces": len(split.pieces) if split else 1,
        "embedding_pieces": len(split_embeddings.pieces) if split_embeddings else 1,
        "piece_units": sum(
            hasattr(unit.module, "vocab_rows")
            for unit in wrapped.modules()
            if unit is not wrapped and hasattr(unit, "module") and isinstance(unit, FullyShardedDataParallel)
        ),
        "embeddings": embeddings,
        "trained_with_grads": trained_with_grads(wrapped, tokens),
    }
    dist.destroy_process_group()


def trained_with_grads(wrapped, tokens: torch.Tensor) -> int:
    """A backward pass under FSDP (the split pieces' units included): how many adapter tensors got a finite gradient."""
    from qlora_lit.fsdp import trained_parameters

    wrapped.train()
    wrapped(input_ids=tokens, labels=tokens).loss.backward()
    return sum(p.grad is not None and bool(p.grad.isfinite().all()) for p in trained_parameters(wrapped))


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["deep_model", "wide_vocab_model"])
def test_under_fsdp_no_rank_holds_the_whole_base_and_the_model_is_the_same(folder, request):
    """Two ranks (gloo) load an 8-layer model through FSDP: each reads every tensor once, holds at most one unit
    unsharded at a time (never the whole base), keeps half of it, and computes the logits of the model loaded whole.
    The untied embeddings and head are units of their own, as QLoRAFSDPStrategy makes them; a head larger than a
    decoder layer is split into pieces of a layer's size (the wide vocabulary), which compute the same logits."""
    path = request.getfixturevalue(folder)
    results = mp.Manager().dict()
    mp.spawn(wrap_and_report, args=(2, free_port(), str(path), results), nprocs=2)
    torch.manual_seed(7)
    whole = whole_peft_model(str(path))
    reference = logits(whole, vocabulary_tokens(whole))
    for rank in (0, 1):
        report = results[rank]
        assert report["loaded"] == report["whole"]  # every base tensor read, each once
        largest = max(report["embeddings"], 0.15 * report["whole"])  # one of the 8 layers, or the embeddings
        if folder == "wide_vocab_model":  # embeddings larger than a layer: in pieces of a layer's size too
            largest = 0.15 * report["whole"]
            assert report["embedding_pieces"] > 1 and report["embeddings"] > largest, report
        assert report["peak"] <= largest, report
        assert report["local"] <= 0.5 * report["whole"] + 64, report  # its half of the base (FSDP pads shards)
        torch.testing.assert_close(report["logits"], reference, rtol=0, atol=0)
        assert (report["head_pieces"] > 1) == (folder == "wide_vocab_model"), report  # split only where larger
        assert report["trained_with_grads"] == 2 * 7 * 8  # LoRA A and B on 7 projections in 8 layers
        pieces = report["head_pieces"] + report["embedding_pieces"]
        assert report["piece_units"] == (pieces if folder == "wide_vocab_model" else 0), report


def test_a_loaded_head_is_left_whole(wide_vocab_model):
    """The pieces of a split head are filled by the unit-by-unit loader; a head already loaded (a base FSDP loads
    whole: 8-bit, renamed tensors) stays as it is."""
    model = whole_peft_model(str(wide_vocab_model))
    head = model.get_base_model().get_output_embeddings()
    assert split_output_head(model) is None and model.get_base_model().get_output_embeddings() is head


def test_lora_initialisation_ignores_the_default_device():
    """Lightning builds the model with the GPU as default device (configure_model runs in its tensor_init_context):
    LoRA A is drawn on the CPU, where its generator is, and moved (a GPU fit failed with 'Expected a cuda device type
    for generator'). A meta default device stands in for the GPU here."""
    like = torch.zeros(4, 64)
    expected = lora_a_init("layers.0.q_proj.lora_A.default.weight", like, seed=7)
    with torch.device("meta"):
        drawn = lora_a_init("layers.0.q_proj.lora_A.default.weight", like, seed=7)
    assert drawn.device == like.device and torch.equal(drawn, expected)

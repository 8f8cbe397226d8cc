"""generate: one prompt (streamed), a prompts file (batched), the bare base; the adapter round trip; clear errors."""

from __future__ import annotations

import copy
import json
import re
import shutil
import sys

import pytest
import torch
import yaml
from conftest import TINY_MODEL, plain_peft
from peft import PeftModel
from transformers import AutoModelForCausalLM
from zoo import build_zoo_model

from qlora_lit.assets import resolve_asset
from qlora_lit.cli import cli_main
from qlora_lit.data.conversations import Message
from qlora_lit.data.inference import encode_prompts, left_pad
from qlora_lit.data.prompts import PromptFormat
from qlora_lit.decoding import generate_texts
from qlora_lit.errors import ConfigError
from qlora_lit.generate import GenerationArgs, load_for_generation
from qlora_lit.model import QuantizationArgs
from qlora_lit.samples import greedy_answers

GREEDY = ["--generation.do_sample", "false", "--generation.max_new_tokens", "6", "--dtype", "fp32"]
UNQUANTIZED = [*GREEDY, "--quantize", "none"]  # 4-bit matrix products are slow on a CPU; padding is what is tested
ROWS = [
    {"instruction": "한국의 수도는?"},
    {"instruction": "다음 문장을 요약해줘.", "input": "서울은 한국의 수도이다.", "id": 7},
    {"instruction": "안녕?"},
    {"instruction": "김치찌개 끓이는 법을 알려줘."},
    {"instruction": "하늘은 왜 파래?"},
]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["qlora_lit"])


@pytest.fixture
def adapter(trained_run) -> str:
    return str(trained_run[0] / "adapter")


def write_prompts(path, rows=ROWS):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def test_single_prompt_streams_the_answer(adapter, capsys):
    answers = cli_main(["generate", "--adapter", adapter, "--prompt", "한국의 아이돌 문화에 대해 알려줘.", *GREEDY])
    assert len(answers) == 1 and answers[0]
    assert answers[0] in capsys.readouterr().out  # printed by the streamer as it was generated


def test_prompts_file_batched_equals_one_at_a_time(adapter, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    batched = cli_main(["generate", "--adapter", adapter, "--prompts_file", prompts, "--batch_size", "3", *UNQUANTIZED])
    output = tmp_path / "out" / "answers.jsonl"
    single = ["--batch_size", "1", "--output", str(output), *UNQUANTIZED]
    assert cli_main(["generate", "--adapter", adapter, "--prompts_file", prompts, *single]) == batched
    written = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert written == [{**row, "generated": answer} for row, answer in zip(ROWS, batched, strict=True)]


def test_an_adapter_saved_without_a_tokenizer_answers_with_the_bases(adapter, tmp_path, capsys):
    """As plain PEFT saves one (adapter_config.json and weights only): the same answers, with a note."""
    bare = tmp_path / "peft-adapter"
    shutil.copytree(adapter, bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "qlora_lit_config.yaml"):
        (bare / name).unlink()
    prompt = ["--prompt", "안녕?", "--prompt_format", "koalpaca", *UNQUANTIZED]
    expected = cli_main(["generate", "--adapter", adapter, *prompt])
    capsys.readouterr()
    assert cli_main(["generate", "--adapter", str(bare), *prompt]) == expected
    assert f"the adapter folder {str(bare)!r} has no tokenizer files: using the base model's" in capsys.readouterr().err


def test_without_adapter_the_base_answers(tmp_path):
    answers = cli_main(["generate", "--model", TINY_MODEL, "--quantize", "none", "--prompt", "안녕?", *GREEDY])
    model, tokenizer, run_config = load_for_generation(model=TINY_MODEL, quantize="none", dtype="fp32")
    assert run_config == {} and not isinstance(model, PeftModel)
    batch = left_pad(tokenizer, encode_prompts(tokenizer, [{"instruction": "안녕?"}]))
    config = GenerationArgs(do_sample=False, max_new_tokens=6).to_generation_config(tokenizer, model)
    expected = model.generate(**batch, generation_config=config)[0, batch["input_ids"].shape[1] :]
    assert answers == [tokenizer.decode(expected, skip_special_tokens=True).strip()]


def test_sampling_defaults_are_the_walkthroughs_and_stop_at_the_tokenizers_eos(tokenizer):
    model = AutoModelForCausalLM.from_pretrained(resolve_asset(TINY_MODEL))
    config = GenerationArgs().to_generation_config(tokenizer, model)
    assert (config.do_sample, config.temperature, config.top_k, config.top_p) == (True, 0.2, 50, 0.95)
    assert (config.repetition_penalty, config.max_new_tokens) == (1.2, 256)
    assert config.eos_token_id[0] == tokenizer.eos_token_id and config.pad_token_id == tokenizer.pad_token_id
    greedy = GenerationArgs(do_sample=False).to_generation_config(tokenizer, model)
    assert not greedy.do_sample and greedy.temperature in (None, 1.0)
    assert greedy.repetition_penalty == 1.0  # plain greedy, as plain PEFT and the in-training samples decode
    chosen = GenerationArgs(do_sample=False, repetition_penalty=1.3).to_generation_config(tokenizer, model)
    assert chosen.repetition_penalty == 1.3


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"repetition_penalty": 0.0}, "generation.repetition_penalty must be > 0 (1.0: none), got 0.0"),
        ({"top_k": -5}, "generation.top_k must be >= 0 (0: no top-k limit), got -5"),
    ],
)
def test_decoding_settings_out_of_range_are_named_before_loading(settings, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        GenerationArgs(**settings)


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_generation_stops_where_trained_answers_end_not_only_at_the_eos(tokenizer):
    """A ChatML template ends answers with <|im_end|>, not the tokenizer's EOS: generate, chat, predict and the
    samples ran on past it to max_new_tokens."""
    chatml = copy.deepcopy(tokenizer)
    chatml.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chatml.chat_template = CHATML
    model = AutoModelForCausalLM.from_pretrained(resolve_asset(TINY_MODEL))
    model.resize_token_embeddings(len(chatml))
    forced = chatml("안녕하세요<|im_end|>\n더 말해요", add_special_tokens=False)["input_ids"]
    steps = []

    def say_forced(module, inputs, logits):  # each forward pass predicts the next token of `forced`
        steps.append(None)
        logits[..., :] = -1e9
        logits[..., forced[len(steps) - 1]] = 0.0

    model.lm_head.register_forward_hook(say_forced)
    assert greedy_answers(model, chatml, ["안녕?"], len(forced), prompt_format="chat") == ["안녕하세요"]
    steps.clear()
    prompt_format = PromptFormat.named("chat", chatml)
    assert prompt_format.stop_token_ids == [chatml.convert_tokens_to_ids("<|im_end|>")] != [chatml.eos_token_id]
    batch = left_pad(chatml, prompt_format.prompt_ids([(Message("user", "안녕?"),)]))
    args = GenerationArgs(do_sample=False, max_new_tokens=len(forced))
    assert generate_texts(model, chatml, batch, args, stop_token_ids=prompt_format.stop_token_ids) == ["안녕하세요"]


def test_prompt_format_comes_from_the_training_config(adapter, tmp_path, capsys):
    chat_adapter = tmp_path / "adapter"
    shutil.copytree(adapter, chat_adapter)
    config_path = chat_adapter / "qlora_lit_config.yaml"
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    config["data"]["prompt_format"] = "chat"  # the tiny tokenizer has no chat template: the error shows it was read
    config_path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["generate", "--adapter", str(chat_adapter), "--prompt", "안녕?", *GREEDY])
    assert exit_info.value.code == 2
    assert 'prompt_format "chat" needs a tokenizer with a chat template' in capsys.readouterr().err


def test_adapter_round_trip_generate_and_plain_peft_have_the_trained_logits(trained_run, adapter, tokenizer):
    _, module = trained_run
    batch = left_pad(tokenizer, encode_prompts(tokenizer, ROWS))
    loaded, _, _ = load_for_generation(adapter, quantize="4bit", dtype="fp32")
    plain = plain_peft(adapter, QuantizationArgs(compute_dtype="float32"))
    with torch.no_grad():
        expected = module(batch["input_ids"], batch["attention_mask"]).logits
        for model in (loaded, plain):
            torch.testing.assert_close(model(**batch).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--adapter", "no/such/adapter", "--prompt", "안녕?"], "adapter folder 'no/such/adapter' does not exist"),
        (["--prompt", "안녕?"], "give --adapter"),
        (["--model", TINY_MODEL], "give exactly one of --prompt or --prompts_file"),
    ],
)
def test_usage_errors_are_one_message(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["generate", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a CUDA GPU")


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("gpu", "device 'gpu' is not a device name: use auto, cpu, cuda or cuda:N"),
        pytest.param("cuda", "device 'cuda': torch sees no CUDA GPU on this machine", marks=NO_CUDA),
        pytest.param("cuda:1", "device 'cuda:1': torch sees no CUDA GPU on this machine", marks=NO_CUDA),
    ],
)
def test_a_device_the_machine_lacks_is_one_message_before_loading(adapter, device, message, capsys, monkeypatch):
    monkeypatch.setattr("qlora_lit.generate.load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for command in (["generate", "--prompt", "안녕?"], ["export", "--output", "merged"]):
        with pytest.raises(SystemExit) as exit_info:
            cli_main([*command, "--adapter", adapter, "--device", device])
        assert exit_info.value.code == 2
        assert f"qlora_lit: error: {message}" in capsys.readouterr().err


def test_an_unwritable_output_is_one_message_before_loading(adapter, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("qlora_lit.generate.load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "a-file").write_text("not a folder")
    answers = ["generate", "--prompts_file", write_prompts(tmp_path / "p.jsonl"), "--output"]
    for command, what in ((answers, "the answers"), (["export", "--output"], "the merged model")):
        with pytest.raises(SystemExit) as exit_info:
            cli_main([*command, str(tmp_path / "a-file" / "out" / "x"), "--adapter", adapter])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert f"cannot write {what} to {tmp_path / 'a-file' / 'out'}" in error and "Point --output at" in error


def test_adapter_folder_without_adapter_config(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["generate", "--adapter", str(tmp_path), "--prompt", "안녕?"])
    assert "has no adapter_config.json" in capsys.readouterr().err


def cut_in_half(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "weights cut short": (lambda folder: cut_in_half(folder / "adapter_model.safetensors"), "is cut short ("),
    "weights missing": (lambda folder: (folder / "adapter_model.safetensors").unlink(), "has no adapter_model"),
    "config not JSON": (lambda folder: cut_in_half(folder / "adapter_config.json"), "is not valid JSON"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_an_adapter_folder_copied_halfway_is_named_before_the_base_loads(
    adapter, damage, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr("qlora_lit.generate.load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    spoil, message = DAMAGES[damage]
    spoil(copy)
    for command in (["generate", "--prompt", "안녕?"], ["export", "--output", str(tmp_path / "merged")]):
        with pytest.raises(SystemExit) as exit_info:
            cli_main([*command, "--adapter", str(copy)])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert message in error and "copy the adapter folder again" in error and "Traceback" not in error


def test_bad_prompts_file_line_is_one_message(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "안녕?"}\n{"instruction": "broken"\n', encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["generate", "--model", TINY_MODEL, "--prompts_file", str(prompts)])
    assert exit_info.value.code == 2
    assert f"qlora_lit: error: {prompts}, line 2: not valid JSON" in capsys.readouterr().err


def test_an_adapter_on_a_base_of_other_shapes_is_one_message_naming_its_own_base(adapter, tmp_path, capsys):
    other = build_zoo_model("llama", tmp_path / "other", dtype=torch.float32)  # width 64; the adapter's base: 128
    for command in (["generate", "--prompt", "안녕?", *UNQUANTIZED], ["export", "--output", str(tmp_path / "m")]):
        with pytest.raises(SystemExit) as exit_info:
            cli_main([*command, "--adapter", adapter, "--model", str(other)])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert f"the adapter in {adapter!r} does not fit the base {str(other)!r} (" in error
        assert f"it was trained on {TINY_MODEL!r}: leave --model out" in error


def test_a_plain_peft_adapter_that_names_no_base_asks_for_model(adapter, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(f"{adapter}/{name}", bare)
    config = json.loads((bare / "adapter_config.json").read_text())
    (bare / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["generate", "--adapter", str(bare), "--prompt", "안녕?", *UNQUANTIZED])
    assert exit_info.value.code == 2
    assert "names no base model (base_model_name_or_path): give the base it was trained on with --model" in (
        capsys.readouterr().err
    )


def test_answers_are_never_written_over_the_prompts_file(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    before = (tmp_path / "prompts.jsonl").read_text(encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["generate", "--model", TINY_MODEL, "--prompts_file", prompts, "--output", prompts, *UNQUANTIZED])
    assert exit_info.value.code == 2
    assert "is the --prompts_file: the answers would replace it" in capsys.readouterr().err
    assert (tmp_path / "prompts.jsonl").read_text(encoding="utf-8") == before

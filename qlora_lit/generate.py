"""Answer prompts with a trained adapter (or a bare base model), in the prompt format it was trained with.

python -m qlora_lit generate --adapter runs/demo/version_0/adapter --prompt "한국의 아이돌 문화에 대해 알려줘."
python -m qlora_lit generate --adapter DIR --prompts_file prompts.jsonl --output answers.jsonl
python -m qlora_lit generate --model meta-llama/Llama-3.2-1B --prompt "..."      # the base before training

A conversation of several turns: `python -m qlora_lit chat` (chat.py), or rows of `messages` in a prompts file.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TextIO

import torch
from peft import PeftModel
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from qlora_lit.data.inference import encode_prompts, left_pad, read_prompts_file
from qlora_lit.data.prompts import PromptFormat, PromptFormatName, trained_format_name, trained_system_prompt
from qlora_lit.decoding import GenerationArgs, generate_texts
from qlora_lit.disk_space import ensure_writable
from qlora_lit.downloads import cut_short
from qlora_lit.dtypes import DTypeFlag, dtype_name
from qlora_lit.errors import ConfigError
from qlora_lit.model import QuantizationArgs, load_base_model
from qlora_lit.preflight import AMPERE, gpu_capability
from qlora_lit.run_files import read_run_config
from qlora_lit.tokenizer import load_tokenizer

DTypeChoice = Literal["auto", DTypeFlag]  # auto: bf16 on a GPU that has it, else fp32


def check_adapter_dir(adapter: str) -> None:
    """The adapter folder is whole: its config reads as JSON and its weights are all there (checked before the base
    model loads, which can take minutes); a folder copied halfway is named with what to do."""
    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file():
        reason = "has no adapter_config.json" if folder.is_dir() else "does not exist"
        raise ConfigError(
            f"adapter folder {adapter!r} {reason}; give the adapter/ folder of a training run, "
            "e.g. runs/demo/version_0/adapter"
        )
    again = "copy the adapter folder again (or export it again from its run's checkpoint)"
    try:
        json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{folder / 'adapter_config.json'} is not valid JSON ({err}): {again}") from err
    weights = [folder / name for name in ("adapter_model.safetensors", "adapter_model.bin")]
    if not any(path.is_file() for path in weights):
        raise ConfigError(f"adapter folder {adapter!r} has no adapter_model.safetensors: {again}")
    if weights[0].is_file() and (damaged := cut_short(weights[0])):
        raise ConfigError(f"the adapter's weights are damaged: {damaged}; {again}")


def resolve_device(device: str) -> torch.device:
    """`auto`: the first GPU if there is one, else the CPU. A device this machine lacks is refused with a message."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device {device!r} is not a device name: use auto, cpu, cuda or cuda:N") from None
    if target.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {device!r}: torch sees no CUDA GPU on this machine; use cpu (or auto)")
        if target.index is not None and target.index >= count:
            raise ConfigError(f"device {device!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return target


def resolve_dtype(dtype: DTypeChoice, device: torch.device) -> str:
    """`auto`: bf16 on an Ampere or newer GPU, fp16 on older ones (V100, T4: no bf16, and what training used there),
    fp32 on a CPU (where bf16 matrix products are slower). torch's `is_bf16_supported()` says yes on a T4: it counts
    emulation."""
    if dtype != "auto":
        return dtype_name(dtype)
    capability = gpu_capability(device)
    if capability is None:
        return "float32"
    return "bfloat16" if capability >= AMPERE else "float16"


def load_for_generation(
    adapter: str | None = None,
    model: str | None = None,
    quantize: Literal["4bit", "none"] = "4bit",
    dtype: DTypeChoice = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """The base (from `model`, else the one the adapter was trained on) with the adapter on top, in eval mode.

    `trust_remote_code` is the caller's (the user's flag) only: an adapter or model folder may come from anyone, so
    its saved config never turns it on, and the base model it names is shown before anything is loaded.
    Returns the model, the tokenizer (the adapter's copy when there is one) and the training run's config ({} if none).
    """
    if adapter is None and model is None:
        raise ConfigError("give --adapter (a trained adapter folder) or --model (a base model to try untrained)")
    if adapter is not None:
        check_adapter_dir(adapter)
    run_config = read_run_config(adapter or (model if Path(model).is_dir() else None))
    trained = run_config.get("model") or {}
    base_name = model or trained.get("model_name_or_path") or _adapter_base_name(adapter)
    if model is None:
        print(f"base model: {base_name!r}, as named in the adapter folder {adapter!r}", file=sys.stderr)
    if trained.get("trust_remote_code") and not trust_remote_code:
        print(
            f"note: the saved config in {adapter or model!r} says trust_remote_code: true; a file you did not write "
            "never turns it on: pass --trust_remote_code true yourself if you trust the code of "
            f"{base_name!r}",
            file=sys.stderr,
        )
    target = resolve_device(device)
    # 4-bit as in training (its NF4/FP4 choice), computing in `dtype`; "none" loads plain bf16/fp32 weights.
    trained_quantization = trained.get("quantization") or {}
    quantization = QuantizationArgs(
        load_in_4bit=quantize == "4bit",
        quant_type=trained_quantization.get("quant_type", "nf4"),
        double_quant=trained_quantization.get("double_quant", True),
        compute_dtype=resolve_dtype(dtype, target),
    )
    loaded = load_base_model(base_name, quantization, target, trust_remote_code)
    if adapter is not None:
        loaded = adapter_on(loaded, adapter, base_name, trained.get("model_name_or_path"))
    tokenizer = load_tokenizer(tokenizer_folder(adapter, base_name), trust_remote_code)
    return loaded.eval(), tokenizer, run_config


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")


def tokenizer_folder(adapter: str | None, base_name: str) -> str:
    """The adapter's copy of the tokenizer (its run's, with any tokens training added) when the folder has one; an
    adapter saved by plain PEFT has none, and then the base model's is used, with a note."""
    if adapter is None:
        return base_name
    if any((Path(adapter) / name).is_file() for name in TOKENIZER_FILES):
        return adapter
    print(f"note: the adapter folder {adapter!r} has no tokenizer files: using the base model's", file=sys.stderr)
    return base_name


def adapter_on(base: PreTrainedModel, adapter: str, base_name: str, trained_on: str | None) -> PeftModel:
    """The adapter loaded onto `base`; one that does not fit it (another model's shapes or layer names) is refused
    with the base it was trained on, instead of peft's state-dict traceback."""
    try:
        return PeftModel.from_pretrained(base, adapter)
    except (RuntimeError, ValueError) as err:  # size mismatch in load_state_dict; target modules not found
        if "size mismatch" not in str(err) and "not found in the base model" not in str(err):
            raise
        trained_on = trained_on or _adapter_base_name(adapter, required=False)
        detail = str(err).strip().splitlines()[-1].strip()
        raise ConfigError(
            f"the adapter in {adapter!r} does not fit the base {base_name!r} ({detail}); it was trained on "
            f"{trained_on!r}: leave --model out, or give that base (or one of its shapes)"
        ) from None


def _adapter_base_name(adapter: str, required: bool = True) -> str | None:
    config = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    name = config.get("base_model_name_or_path")
    if not name and required:
        raise ConfigError(
            f"{str(Path(adapter) / 'adapter_config.json')!r} names no base model (base_model_name_or_path): give the "
            "base it was trained on with --model"
        )
    return name or None


def generate(
    prompt: str | None = None,
    input: str | None = None,
    prompts_file: str | None = None,
    output: str | None = None,
    adapter: str | None = None,
    model: str | None = None,
    prompt_format: PromptFormatName | None = None,
    system: str | None = None,
    quantize: Literal["4bit", "none"] = "4bit",
    dtype: DTypeChoice = "auto",
    generation: GenerationArgs = GenerationArgs(),  # noqa: B008 - frozen-by-convention settings
    batch_size: int = 8,
    device: str = "auto",
    seed: int | None = None,
    trust_remote_code: bool = False,
) -> list[str]:
    """Answer one prompt (streamed to the terminal) or a JSONL file of prompts with a trained adapter.

    Args:
        prompt: an instruction to answer; the answer is printed as it is generated.
        input: optional extra input for `prompt` (selects the template with an input section).
        prompts_file: JSONL file, one {"instruction": ..., "input": ...} object per line ("input" optional), or a
            conversation ({"messages": [...]} or ShareGPT's {"conversations": [...]}) whose last turn, the user's,
            is answered.
        output: where the answers to `prompts_file` go, as JSONL (each row plus "generated"); default: stdout.
        adapter: a trained adapter folder (runs/NAME/version_N/adapter); its base and prompt format come with it.
        model: base model (hub id or folder): alone, to try it untrained; with `adapter`, instead of the trained base.
        prompt_format: template to wrap prompts in; default: the one the adapter was trained with, else koalpaca.
        system: system prompt of prompts that have none; default: the adapter's (its run's data.system_prompt);
            "" for none.
        quantize: load the base in 4 bits as in training, or unquantized (`none`) in `dtype`.
        dtype: compute dtype; auto is bf16 on Ampere or newer GPUs, fp16 on older ones (V100, T4), fp32 on a CPU.
        generation: decoding settings.
        batch_size: prompts generated together from `prompts_file` (left-padded).
        device: cuda, cuda:1, cpu, or auto (the first GPU if there is one).
        seed: seed for sampling, for repeatable answers.
        trust_remote_code: run Python code shipped with the base model. Only for models you trust; never taken from
            the adapter's or model's saved config.
    """
    if (prompt is None) == (prompts_file is None):
        raise ConfigError("give exactly one of --prompt or --prompts_file")
    if prompt is not None and not prompt.strip():
        raise ConfigError("--prompt is empty: give an instruction to answer")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    rows = [{"instruction": prompt, "input": input}] if prompt is not None else read_prompts_file(prompts_file)
    if output is not None:
        if Path(output).expanduser().is_dir():
            raise ConfigError(f"--output {output!r} is a folder; give the path of the JSONL file to write")
        if (
            prompts_file is not None
            and Path(output).expanduser().resolve() == Path(prompts_file).expanduser().resolve()
        ):
            raise ConfigError(
                f"--output {output!r} is the --prompts_file: the answers would replace it (an interrupted run would "
                "leave the finished batches' rows only); give another file"
            )
        ensure_writable(Path(output).expanduser().parent, "the answers", "--output")
    loaded, tokenizer, run_config = load_for_generation(adapter, model, quantize, dtype, device, trust_remote_code)
    prompt_format = prompt_format or trained_format_name(run_config)
    system = trained_system_prompt(run_config) if system is None else system
    if seed is not None:
        torch.manual_seed(seed)
    encoded = encode_prompts(tokenizer, rows, prompt_format, system)
    stop = PromptFormat.named(prompt_format, tokenizer).stop_token_ids
    if prompt is not None:
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        batch = left_pad(tokenizer, encoded)
        return generate_texts(loaded, tokenizer, batch, generation, streamer, stop_token_ids=stop)
    return answer_rows(loaded, tokenizer, rows, encoded, generation, batch_size, output, stop)


def answer_rows(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    encoded: list[list[int]],
    generation: GenerationArgs,
    batch_size: int,
    output: str | None,
    stop_token_ids: list[int],
) -> list[str]:
    """Answer `rows` (their prompts `encoded`) in batches, writing each row plus its "generated" answer as JSONL as
    soon as a batch is done; answers stop at `stop_token_ids` (the prompt format's) or the EOS."""
    answers: list[str] = []
    with open_output(output) as sink, tqdm(total=len(rows), unit="prompt", desc="generate", file=sys.stderr) as bar:
        for start in range(0, len(rows), batch_size):
            batch = left_pad(tokenizer, encoded[start : start + batch_size])
            texts = generate_texts(model, tokenizer, batch, generation, stop_token_ids=stop_token_ids)
            for row, text in zip(rows[start : start + batch_size], texts, strict=True):
                sink.write(json.dumps({**row, "generated": text}, ensure_ascii=False) + "\n")
            sink.flush()  # finished batches survive an interrupted run
            answers += texts
            bar.update(len(texts))
    return answers


@contextmanager
def open_output(output: str | None) -> Iterator[TextIO]:
    if output is None:
        yield sys.stdout
        return
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", encoding="utf-8") as sink:
        yield sink

"""Merge a trained adapter into its base model and save a plain Hugging Face model folder.

python -m qlora_lit export --adapter runs/base/version_0/adapter --output merged/ [--dtype bf16|fp32]

The base is loaded unquantized: merging into 4-bit weights would round the merged weights to NF4 and lose what the
adapter learned. The result loads with `AutoModelForCausalLM.from_pretrained(output)`, no peft or bitsandbytes needed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import PreTrainedModel

from qlora_lit.data.inference import encode_prompts, left_pad
from qlora_lit.data.prompts import trained_format_name
from qlora_lit.disk_space import ensure_writable
from qlora_lit.dtypes import DTypeFlag
from qlora_lit.errors import ConfigError
from qlora_lit.generate import check_adapter_dir, load_for_generation
from qlora_lit.run_files import CONFIG_NAME

# Prompts the merged model is checked on: with and without the input section, in the training template.
CHECK_ROWS = [
    {"instruction": "한국의 아이돌 문화에 대해 알려줘."},
    {"instruction": "다음 문장을 요약해줘.", "input": "서울은 한국의 수도이며 가장 큰 도시이다."},
    {"instruction": "김치찌개 끓이는 법을 단계별로 설명해줘."},
]


def export(
    adapter: str,
    output: str,
    dtype: DTypeFlag = "bf16",
    model: str | None = None,
    device: str = "auto",
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> float:
    """Merge the adapter into the full-precision base, save model + tokenizer, report the merge's logit difference.

    Args:
        adapter: a trained adapter folder (runs/NAME/version_N/adapter).
        output: folder for the merged model; it must be empty or absent unless `overwrite`.
        dtype: dtype the base is loaded, merged and saved in.
        model: base model (hub id or folder) instead of the one the adapter was trained on.
        device: where the merge runs: cuda, cpu, or auto (the first GPU if there is one).
        overwrite: replace what is in `output`.
        trust_remote_code: run Python code shipped with the base model. Only for models you trust; never taken from
            the adapter's saved config.

    Returns:
        The largest absolute logit difference between the merged model and base + adapter on a few sample prompts.
    """
    check_adapter_dir(adapter)
    target = Path(output).expanduser()
    for given, flag in ((adapter, "--adapter"), (model, "--model")):
        source = Path(given).expanduser().resolve() if given and Path(given).expanduser().exists() else None
        if source is not None and (target.resolve().is_relative_to(source) or source.is_relative_to(target.resolve())):
            raise ConfigError(
                f"--output {output!r} is the {flag} folder, inside it, or holds it (a run folder): replacing it would "
                "delete the input, mixing would spoil it; choose a folder apart from it"
            )
    if target.exists() and not target.is_dir():  # --overwrite replaces a folder's files, never a file of the user's
        raise ConfigError(f"--output {output!r} is a file: a merged model is a folder of files; name a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ConfigError(
            f"--output {output!r} is a folder that is not empty; choose another, or --overwrite true to replace it"
        )
    ensure_writable(target.parent, "the merged model", "--output")
    peft_model, tokenizer, run_config = load_for_generation(
        adapter, model, quantize="none", dtype=dtype, device=device, trust_remote_code=trust_remote_code
    )
    samples = left_pad(tokenizer, encode_prompts(tokenizer, CHECK_ROWS, trained_format_name(run_config)))
    unmerged = real_token_logits(peft_model, samples)
    untie_adapted_head(peft_model)
    merged = peft_model.merge_and_unload()
    difference = (real_token_logits(merged, samples) - unmerged).abs().max().item()
    if target.exists():
        shutil.rmtree(target)
    merged.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    if (Path(adapter) / CONFIG_NAME).is_file():  # generate --model <output> then finds the prompt format
        shutil.copyfile(Path(adapter) / CONFIG_NAME, target / CONFIG_NAME)
    print(f"merged model saved to {target} ({dtype})")
    print(f"largest logit difference, merged vs base + adapter, on {len(CHECK_ROWS)} prompts: {difference:.3g}")
    return difference


def untie_adapted_head(peft_model: PeftModel) -> bool:
    """Give an adapted output head a weight of its own where it shares the input embeddings' (tied: Llama 3.2 1B/3B,
    Qwen2.5, Gemma): merging its adapter into the shared weight would change the input embeddings too, and the saved
    config would tie them again. Returns whether it untied them."""
    base = peft_model.get_base_model()
    head, embeddings = base.get_output_embeddings(), base.get_input_embeddings()
    if not isinstance(head, BaseTunerLayer) or embeddings is None:
        return False
    layer = head.get_base_layer()
    if layer.weight is not embeddings.weight:
        return False
    layer.weight = torch.nn.Parameter(embeddings.weight.detach().clone(), requires_grad=False)
    for config in {id(base.config): base.config, id(text := base.config.get_text_config()): text}.values():
        config.tie_word_embeddings = False
    return True


def real_token_logits(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Float32 logits at the prompts' real (not padding) positions."""
    with torch.inference_mode():
        logits = model(
            input_ids=batch["input_ids"].to(model.device), attention_mask=batch["attention_mask"].to(model.device)
        ).logits
    return logits[batch["attention_mask"].bool().to(logits.device)].float()

"""The model's tokenizer, loaded the one way every command uses it (training, samples, generate, the adapter folder)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from qlora_lit.assets import resolve_asset
from qlora_lit.errors import ConfigError, not_found_message, remote_code_message


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's tokenizer; one without a pad token pads with EOS (safe: labels are masked by position)."""
    try:
        # trust_remote_code always given: left unset, transformers asks on the terminal whether to run the code
        tokenizer = AutoTokenizer.from_pretrained(resolve_asset(name_or_path), trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ConfigError(not_found_message("tokenizer", name_or_path, err)) from err
    except ValueError as err:  # the tokenizer's own code would have to run; or a local folder without its files
        if "trust_remote_code" in str(err):
            raise ConfigError(remote_code_message(name_or_path)) from err
        if Path(name_or_path).expanduser().exists():  # transformers blamed a missing sentencepiece
            raise ConfigError(not_found_message("tokenizer", name_or_path, err)) from err
        raise
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer {name_or_path!r} has no EOS token: the model could not learn to stop")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer

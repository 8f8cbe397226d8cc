"""The Korean Alpaca prompt templates and how one example becomes token ids."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

PROMPT_WITH_INPUT = """아래는 작업을 설명하는 지시사항과 추가 정보를 제공하는 입력이 짝으로 구성됩니다. 이에 대한 적절한 응답을 작성해주세요.

### 지시사항:
{instruction}

### 입력:
{input}

### 응답:"""

PROMPT_NO_INPUT = """아래는 작업을 설명하는 지시사항입니다. 이에 대한 적절한 응답을 작성해주세요.

### 지시사항:
{instruction}

### 응답:"""


def build_prompt(instruction: str, input: str | None = None) -> str:
    """The prompt the model completes; a missing or blank `input` selects the no-input template."""
    if input and input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def encode_example(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int
) -> dict[str, list[int] | int]:
    """Token ids of prompt + response + the tokenizer's own EOS, cut at `max_length`.

    Prompt and response are tokenized separately so the prompt's length is known exactly (the collator masks the
    prompt by position). A response cut by `max_length` loses its EOS: the model must not learn to stop there.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    return {"input_ids": input_ids, "prompt_length": min(len(prompt_ids), max_length)}

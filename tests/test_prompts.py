from qlora_lit.data.conversations import row_messages
from qlora_lit.data.length import cut
from qlora_lit.data.prompts import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, PromptFormat, build_prompt

EXPECTED_WITH_INPUT = (
    "아래는 작업을 설명하는 지시사항과 추가 정보를 제공하는 입력이 짝으로 구성됩니다. "
    "이에 대한 적절한 응답을 작성해주세요.\n\n"
    "### 지시사항:\n다음 문장을 요약해줘.\n\n"
    "### 입력:\n서울은 한국의 수도이다.\n\n"
    "### 응답:"
)
EXPECTED_NO_INPUT = (
    "아래는 작업을 설명하는 지시사항입니다. 이에 대한 적절한 응답을 작성해주세요.\n\n"
    "### 지시사항:\n한국의 아이돌 문화에 대해 알려줘.\n\n"
    "### 응답:"
)


def test_templates_render_exactly():
    assert build_prompt("다음 문장을 요약해줘.", "서울은 한국의 수도이다.") == EXPECTED_WITH_INPUT
    assert build_prompt("한국의 아이돌 문화에 대해 알려줘.") == EXPECTED_NO_INPUT


def test_missing_or_blank_input_selects_no_input_template():
    for blank in (None, "", "   \n"):
        assert build_prompt("한국의 아이돌 문화에 대해 알려줘.", blank) == EXPECTED_NO_INPUT


def test_the_walkthroughs_two_templates_are_the_single_turn_case():
    assert PROMPT_NO_INPUT.format(instruction="한국의 아이돌 문화에 대해 알려줘.") == EXPECTED_NO_INPUT
    assert PROMPT_WITH_INPUT.format(instruction="다음 문장을 요약해줘.", input="서울은 한국의 수도이다.") == (
        EXPECTED_WITH_INPUT
    )


def encode(tokenizer, instruction: str, output: str):
    [tokens] = PromptFormat.named("koalpaca", tokenizer).encode([row_messages(instruction, None, output)])
    return tokens


def test_encoding_ends_with_the_tokenizers_own_eos(tokenizer):
    tokens = encode(tokenizer, "안녕?", "안녕하세요!")
    prompt_ids = tokenizer(build_prompt("안녕?"))["input_ids"]
    assert tokens.ids[: len(prompt_ids)] == prompt_ids
    assert tokens.trained == [(len(prompt_ids), len(tokens.ids))]
    assert tokens.ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(tokens.ids[len(prompt_ids) : -1]) == "안녕하세요!"


def test_truncated_response_loses_its_eos(tokenizer):
    prompt_length = len(tokenizer(build_prompt("긴 답을 해줘."))["input_ids"])
    example = cut(encode(tokenizer, "긴 답을 해줘.", "아주 긴 대답입니다. " * 50), max_length=prompt_length + 5)
    assert len(example["input_ids"]) == prompt_length + 5
    assert example["trained_spans"] == [(prompt_length, prompt_length + 5)]
    assert tokenizer.eos_token_id not in example["input_ids"][prompt_length:]

from qlora_lit.data.prompts import build_prompt, encode_example

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


def test_encoding_ends_with_the_tokenizers_own_eos(tokenizer):
    example = encode_example(tokenizer, build_prompt("안녕?"), "안녕하세요!", max_length=256)
    prompt_ids = tokenizer(build_prompt("안녕?"))["input_ids"]
    assert example["input_ids"][: len(prompt_ids)] == prompt_ids
    assert example["prompt_length"] == len(prompt_ids)
    assert example["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example["input_ids"][len(prompt_ids) : -1]) == "안녕하세요!"


def test_truncated_response_loses_its_eos(tokenizer):
    prompt = build_prompt("긴 답을 해줘.")
    prompt_length = len(tokenizer(prompt)["input_ids"])
    example = encode_example(tokenizer, prompt, "아주 긴 대답입니다. " * 50, max_length=prompt_length + 5)
    assert len(example["input_ids"]) == prompt_length + 5
    assert tokenizer.eos_token_id not in example["input_ids"][prompt_length:]

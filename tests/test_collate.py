import torch

from qlora_lit.data.collate import IGNORE_INDEX, PaddingCollator

EOS = 2


def examples():
    # pad == EOS, as for Llama 3 tokenizers with no pad token: masking must go by position
    return [
        {"input_ids": [1, 10, 11, 12, 20, 21, EOS], "prompt_length": 4},
        {"input_ids": [1, 13, 22, EOS], "prompt_length": 2},
    ]


def test_padding_is_masked_by_position_and_eos_is_kept():
    batch = PaddingCollator(pad_id=EOS)(examples())
    assert batch["input_ids"].shape == (2, 8)  # longest is 7, padded to a multiple of 8
    assert batch["attention_mask"].tolist() == [[1] * 7 + [0], [1] * 4 + [0] * 4]
    assert batch["input_ids"][1].tolist() == [1, 13, 22, EOS, EOS, EOS, EOS, EOS]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX] * 4 + [20, 21, EOS, IGNORE_INDEX],
        [IGNORE_INDEX] * 2 + [22, EOS] + [IGNORE_INDEX] * 4,
    ]


def test_train_on_prompt_keeps_prompt_labels_but_not_padding():
    batch = PaddingCollator(pad_id=EOS, train_on_prompt=True, pad_to_multiple_of=1)(examples())
    assert batch["input_ids"].shape == (2, 7)
    assert batch["labels"][0].tolist() == [1, 10, 11, 12, 20, 21, EOS]
    assert batch["labels"][1].tolist() == [1, 13, 22, EOS] + [IGNORE_INDEX] * 3
    assert torch.equal(batch["labels"] != IGNORE_INDEX, batch["attention_mask"].bool())

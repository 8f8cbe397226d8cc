import torch

from qlora_lit.data.collate import IGNORE_INDEX, PaddingCollator, label_count

EOS = 2


def examples():
    # pad == EOS, as for Llama 3 tokenizers with no pad token: masking must go by position
    return [
        {"input_ids": [1, 10, 11, 12, 20, 21, EOS], "trained_spans": [(4, 7)]},
        {"input_ids": [1, 13, 22, EOS], "trained_spans": [(2, 4)]},
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


def test_every_answer_of_a_conversation_is_labelled_and_nothing_between_them():
    conversation = {"input_ids": [1, 10, 11, 20, EOS, 12, 13, 21, 22, EOS], "trained_spans": [(3, 5), (7, 10)]}
    batch = PaddingCollator(pad_id=EOS, pad_to_multiple_of=1)([conversation])
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * 3 + [20, EOS] + [IGNORE_INDEX] * 2 + [21, 22, EOS]
    assert label_count(conversation) == 5 and label_count(conversation, train_on_prompt=True) == 9

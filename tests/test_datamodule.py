"""The DataModule: length policy and its counts, the token cache, the chat format, and bad settings."""

from __future__ import annotations

import copy
import json
from unittest import mock

import pytest
from conftest import SAMPLE_DATA, TINY_MODEL

from qlora_lit.data import KoAlpacaDataModule
from qlora_lit.data.collate import IGNORE_INDEX, PaddingCollator
from qlora_lit.data.datamodule import rank_share
from qlora_lit.data.sampler import EpochBatchSampler, batch_count
from qlora_lit.errors import ConfigError

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_data(**settings) -> KoAlpacaDataModule:
    defaults = {"path": SAMPLE_DATA, "tokenizer": TINY_MODEL, "max_length": 128, "batch_size": 4, "val_size": 8}
    return KoAlpacaDataModule(**{**defaults, **settings})


def test_overlong_rows_are_truncated_or_dropped_and_counted():
    truncated, dropped = make_data(), make_data(overlong="drop")
    truncated.setup()
    dropped.setup()
    stats = truncated.stats
    assert stats["overlong"] > 0 and stats["overlong"] == dropped.stats["overlong"]
    assert stats["truncated"] + stats["prompt_too_long_dropped"] == stats["overlong"]
    assert dropped.stats["overlong_dropped"] + dropped.stats["prompt_too_long_dropped"] == stats["overlong"]
    assert dropped.stats["truncated"] == 0
    kept = truncated.stats["train_rows"] + truncated.stats["val_rows"]
    assert kept == stats["rows_kept"] - stats["prompt_too_long_dropped"]
    assert dropped.stats["train_rows"] + dropped.stats["val_rows"] == stats["rows_kept"] - stats["overlong"]
    assert max(len(example["input_ids"]) for example in truncated.train_set) == 128


def test_nothing_left_after_the_length_policy_says_so(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"instruction": "길게 " * 40, "output": "답 " * 40}, ensure_ascii=False))
    with pytest.raises(ConfigError, match=r"no rows left: all 1 are longer than data.max_length=16"):
        make_data(path=str(path), max_length=16, overlong="drop").setup()


def test_tokenization_is_cached_and_reused_across_runs(tmp_path):
    first = make_data(cache_dir=str(tmp_path))
    first.setup()
    cache_files = sorted(tmp_path.glob("tokens-*.parquet"))
    assert len(cache_files) == 1
    with mock.patch("qlora_lit.data.datamodule.load_conversations", side_effect=AssertionError("read again")):
        again = make_data(cache_dir=str(tmp_path))
        again.setup()
        longer = make_data(cache_dir=str(tmp_path), max_length=256)  # length settings apply to the cached ids
        longer.setup()
    assert again.train_set == first.train_set and again.stats == first.stats
    assert max(len(example["input_ids"]) for example in longer.train_set) == 256
    make_data(cache_dir=str(tmp_path), columns={"instruction": "output", "output": "instruction"}).setup()
    assert len(list(tmp_path.glob("tokens-*.parquet"))) == 2  # another reading of the data: another cache
    make_data(cache_dir=str(tmp_path), system_prompt="짧게 답하세요.").setup()
    assert len(list(tmp_path.glob("tokens-*.parquet"))) == 3  # another system prompt: other ids


def test_a_damaged_token_cache_is_built_again(tmp_path):
    """A copy cut short (pyarrow's ArrowInvalid: no footer) or damaged inside: nothing is lost, it is rebuilt."""
    first = make_data(cache_dir=str(tmp_path))
    first.setup()
    (cache,) = tmp_path.glob("tokens-*.parquet")
    whole = cache.read_bytes()
    footer = int.from_bytes(whole[-8:-4], "little") + 8  # the file's description, at its end
    inside = whole[:4] + bytes(len(whole) - 4 - footer) + whole[-footer:]  # its data zeroed, the footer whole
    for damaged in (whole[: len(whole) // 2], inside):
        cache.write_bytes(damaged)
        again = make_data(cache_dir=str(tmp_path))
        with pytest.warns(UserWarning, match=r"the token cache .*tokens-.*parquet cannot be read \(.*\): tokenizing"):
            again.setup()
        assert again.train_set == first.train_set and cache.read_bytes() == whole


def test_a_cache_folder_that_cannot_be_written_names_the_setting(tmp_path, monkeypatch):
    """QLORA_LIT_CACHE at a file, a data.cache_dir that cannot be made, a home folder one cannot write (read-only
    homes are common on clusters): each was a traceback from mkdir."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(ConfigError, match=r"cannot write the tokenized data to .*a_file/cache: .*Point data.cache_dir"):
        make_data(cache_dir=str(a_file / "cache")).prepare_data()
    monkeypatch.setenv("QLORA_LIT_CACHE", str(a_file))
    with pytest.raises(ConfigError, match=r"to .*a_file: \[Errno 17\] File exists.*Point QLORA_LIT_CACHE at a writ"):
        make_data().prepare_data()
    monkeypatch.delenv("QLORA_LIT_CACHE")
    monkeypatch.setenv("HOME", str(a_file))
    with pytest.raises(ConfigError, match=r"Point QLORA_LIT_CACHE or data.cache_dir \(the default, ~/.cache/qlora_lit"):
        make_data().prepare_data()


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    """The tiny tokenizer has no chat template: a copy with one, saved like an instruct model's."""
    from qlora_lit.data.datamodule import load_tokenizer

    tokenizer = copy.deepcopy(load_tokenizer(TINY_MODEL))
    tokenizer.chat_template = CHAT_TEMPLATE
    folder = tmp_path_factory.mktemp("chat_tokenizer")
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_chat_format_uses_the_template_and_trains_on_the_assistant_turn_only(tmp_path, chat_tokenizer):
    path = tmp_path / "one.jsonl"
    rows = [
        {"instruction": "안녕?", "input": "", "output": "안녕하세요!"},
        {"instruction": "요약해줘.", "output": "네."},
    ]
    path.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows))
    data = make_data(path=str(path), tokenizer=chat_tokenizer, prompt_format="chat", val_size=1, seed=0)
    data.setup()
    example = data.val_set[0]
    tokenizer = data.tokenizer
    assert (
        tokenizer.decode(example["input_ids"]) == "<|user|>안녕?<|end_of_text|><|assistant|>안녕하세요!<|end_of_text|>"
    )
    labels = data.collator()([example])["labels"][0]
    trained = [token for token in labels.tolist() if token != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "안녕하세요!<|end_of_text|>"  # the answer and the template's end of turn


def test_chat_format_without_a_chat_template_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"prompt_format=chat needs a tokenizer with a chat template.*has none"):
        make_data(prompt_format="chat").setup()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"overlong": "cut"}, r"data.overlong must be one of \['truncate', 'drop'\], got 'cut'"),
        ({"prompt_format": "alpaca"}, r"data.prompt_format must be one of \['koalpaca', 'chat'\]"),
        ({"encoding": "klingon"}, r"data.encoding 'klingon' is not an encoding"),
        ({"pack_length": 64}, r"data.pack_length=64 must be 0/null \(no packing\) or >= data.max_length=128"),
        ({"columns": {"answer": "output"}}, r"data.columns maps 'answer', which is not one of"),
        ({"path": []}, r"data.path is empty"),
        ({"bad_rows": "ignore"}, r"data.bad_rows must be one of \['error', 'skip'\], got 'ignore'"),
        ({"columns": {"role": "speaker"}}, r"data.columns names the messages' keys in pairs: give both role and"),
        ({"columns": {"messages": "dialog", "output": "answer"}}, r"both a conversation column \(messages\) and"),
    ],
)
def test_bad_data_settings_fail_at_construction(setting, message):
    with pytest.raises(ConfigError, match=message):
        make_data(**setting)


@pytest.mark.parametrize(("rows", "world_size"), [(5, 2), (8, 4), (3, 4), (7, 1)])
def test_each_validation_row_is_on_one_rank_and_every_rank_runs_as_many_batches(rows, world_size):
    """Every rank validated the whole set before (each GPU of eight did the work of one); the shares are evened out
    with label-less copies, since under FSDP the ranks meet in every forward pass."""
    examples = [{"input_ids": [3, 4, 5 + index], "trained_spans": [(1, 3)]} for index in range(rows)]
    shares = [rank_share(examples, rank, world_size) for rank in range(world_size)]
    assert len({len(share) for share in shares}) == 1
    real = [example for share in shares for example in share if not example.get("filler")]
    assert sorted(example["input_ids"][-1] for example in real) == [5 + index for index in range(rows)]
    fillers = [example for share in shares for example in share if example.get("filler")]
    collated = PaddingCollator(pad_id=0)(fillers) if fillers else None
    assert collated is None or bool((collated["labels"] == IGNORE_INDEX).all())


def test_batches_left_out_so_that_ranks_get_as_many_are_said(caplog):
    """The sampler drops the last batches of an epoch that do not split evenly over the ranks; it counted them, and
    nothing said so."""
    data = KoAlpacaDataModule(SAMPLE_DATA, tokenizer=TINY_MODEL, max_length=96, val_size=8)
    data.setup()
    batch_size = next(size for size in range(1, 9) if batch_count(len(data.train_set), size) % 2)
    data.batch_size = batch_size
    with mock.patch.object(EpochBatchSampler, "world", return_value=(0, 2)), caplog.at_level("INFO"):
        data.train_dataloader()
    total = batch_count(len(data.train_set), batch_size)
    assert f"each epoch leaves out its last 1 of {total} batches (of up to {batch_size} examples), so that" in (
        caplog.text
    )
    caplog.clear()
    with caplog.at_level("INFO"):
        data.train_dataloader()  # one rank: nothing left out
    assert "leaves out" not in caplog.text

"""Text for TensorBoard: what a model generates or a config says is shown as it is, never read as markdown."""

from __future__ import annotations

from conftest import shown_by_tensorboard

from qlora_lit.text_log import as_prose, verbatim

TRICKY = """1. 목록처럼 시작하는 답 *별표* _밑줄_ `백틱` <b>태그</b> &amp; a|b [링크](http://x.y)
# 제목처럼
===
    들여쓴 줄
- 하이픈 > 인용"""


def test_prose_shows_the_text_as_it_is():
    shown = shown_by_tensorboard(as_prose(TRICKY))
    assert shown.splitlines() == [line.strip() for line in TRICKY.splitlines()]
    assert shown_by_tensorboard(as_prose("  \n")) == "(empty)"


def test_verbatim_keeps_indentation():
    config = "model:\n  lora:\n    r: 8  # <rank> *not* emphasis"
    assert shown_by_tensorboard(verbatim(config)).strip("\n") == config

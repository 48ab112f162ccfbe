"""A teacher that writes its own <think>...</think> span is parsed, not marked malformed."""

from __future__ import annotations

import pytest

from mmemb.teachers.base import finalize, split_think

CLOSED = "<think>\nThe page is an invoice; the query asks for its total.\n</think>\n\n" \
    "The target must show the invoice total."
OPENED = "The page is an invoice; the query asks for its total.\n</think>\n\n" \
    "The target must show the invoice total."  # the chat template already opened <think>
THINKING = "The page is an invoice; the query asks for its total."
ANSWER = "The target must show the invoice total."


def test_split_think_both_output_shapes():
    assert split_think(CLOSED) == (THINKING, ANSWER)
    assert split_think(OPENED) == (THINKING, ANSWER)
    assert split_think("<think>still thinking") == ("still thinking", None)
    assert split_think("no span at all") == (None, "no span at all")


@pytest.mark.parametrize("raw", [CLOSED, OPENED])
@pytest.mark.parametrize("think,expected", [("answer", ANSWER), ("thinking", THINKING)])
def test_think_output_picks_the_rationale_and_keeps_the_raw_text(raw, think, expected):
    c = finalize(raw, 40, "stop", think=think, count=lambda s: len(s.split()))
    assert c.status == "ok" and c.error is None
    assert c.text == expected
    assert c.raw_text == raw  # the verbatim output stays auditable
    assert c.n_tokens == len(expected.split())  # the rationale's own length, not the 40


def test_without_think_parsing_the_span_is_malformed_as_before():
    c = finalize(CLOSED, 40, "stop")  # the oracle's path: verbatim
    assert c.text == CLOSED and c.raw_text is None and c.n_tokens == 40
    assert c.error.startswith("malformed:") and "<think>" in c.error


def test_reserved_tokens_left_after_parsing_stay_malformed():
    c = finalize("<think>a</think>the target <emb> shows b", 9, "stop", think="answer")
    assert c.text == "the target <emb> shows b"
    assert c.error.startswith("malformed:") and "'<emb>'" in c.error
    c = finalize("<think>a <|im_start|> b</think>fine", 9, "stop", think="thinking")
    assert c.text == "a <|im_start|> b" and c.error.startswith("malformed:")
    c = finalize("a</think>b</think>c", 9, "stop", think="answer")  # a second close
    assert c.text == "b</think>c" and "'</think>'" in c.error


def test_thinking_that_never_closes():
    c = finalize("<think>reasoning that ran out", 96, "length", think="answer")
    assert c.status == "truncated" and c.text == "" and c.raw_text.startswith("<think>")
    c = finalize("<think>reasoning then a stop", 12, "stop", think="answer")
    assert c.status == "empty" and "never closed" in c.error
    c = finalize("<think>reasoning then a stop", 12, "stop", think="thinking")
    assert c.status == "ok" and c.text == "reasoning then a stop" and c.error is None


def test_text_without_a_span_is_kept_verbatim():
    for think in ("answer", "thinking"):
        c = finalize("plain rationale", 3, "stop", think=think)
        assert c.text == "plain rationale" and c.raw_text is None and c.n_tokens == 3
    c = finalize("mid-text <think> is not a span", 7, "stop", think="answer")
    assert c.raw_text is None and c.error.startswith("malformed:")

"""TextStream: streamed deltas add up to the answer, cut exactly where a stop sequence completes.

Reference twin: decode every token prefix in full (the slow way) and cut the first prefix whose
text contains a stop sequence at that sequence's earliest start.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskmoe.serving.textstream import TextStream


def reference(decode, ids, stops):
    for k in range(1, len(ids) + 1):
        text = decode(ids[:k])
        hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
        if hits:
            return text[: min(hits)], True, k
    return decode(ids), False, len(ids)


def run(decode, ids, stops):
    ts = TextStream(decode, stops)
    pieces, used = [], 0
    for tok in ids:
        pieces.append(ts.push(tok))
        used += 1
        if ts.stopped:
            break
    pieces.append(ts.finish())
    assert "".join(pieces) == ts.text
    return ts.text, ts.stopped, used


def test_hand_example_withholds_a_possible_stop_prefix() -> None:
    """Byte tokens of "ab#X#Yc" with stop "#Y": "#" is withheld until "X" shows it is not the stop,
    the second "#" until "Y" completes it; the answer is "ab#X" and the token after is never read."""
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    ts = TextStream(decode, ["#Y"])
    out = [ts.push(b) for b in b"ab#X#Y"]
    assert out == ["a", "b", "", "#X", "", ""]
    assert ts.stopped and ts.text == "ab#X" and ts.finish() == ""


def test_multibyte_character_is_held_until_complete() -> None:
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    ts = TextStream(decode)
    assert [ts.push(b) for b in "é!".encode()] == ["", "é", "!"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60), stops=st.lists(st.text(min_size=1, max_size=3).filter(lambda s: "\ufffd" not in s), max_size=3))
def test_stream_equals_full_decode_reference(tokenizer, text, stops) -> None:
    decode = lambda ids: tokenizer.decode(ids)  # noqa: E731
    ids = tokenizer.encode(text, allow_special=False)
    want_text, want_stopped, want_used = reference(decode, ids, stops)
    got_text, got_stopped, got_used = run(decode, ids, stops)
    assert (got_text, got_stopped) == (want_text, want_stopped)
    if want_stopped:
        assert got_used == want_used  # halted on the very token that completed the stop sequence
    if not stops:
        assert got_text == text  # byte-level BPE round-trips exactly


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_token_ids_still_add_up(tokenizer, data) -> None:
    """Arbitrary ids (possibly invalid UTF-8) never lose text: deltas always concatenate to .text."""
    ids = data.draw(st.lists(st.integers(0, tokenizer.vocab_size - 1), max_size=40))
    run(lambda x: tokenizer.decode(x, skip_special=True), ids, data.draw(st.lists(st.sampled_from(["e", "th", "\n"]), max_size=2)))

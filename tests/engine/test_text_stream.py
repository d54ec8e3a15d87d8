"""Streaming detokenization: never half a UTF-8 character, never a piece of a stop string."""

from corral.engine.generate import TextStream


def feed(stream, chunks):
    return [stream.push(c) for c in chunks]


def test_multibyte_character_split_across_tokens_is_held_until_whole():
    stream = TextStream()
    snowman = "☃".encode()  # 3 bytes, fed one token each
    assert feed(stream, [b"a", snowman[:1], snowman[1:2]]) == ["a", "", ""]
    assert stream.push(snowman[2:]) == "☃"
    assert stream.finish() == "" and stream.text == "a☃"


def test_stop_string_spanning_tokens_is_cut_and_never_shown():
    stream = TextStream(stop=["STOP"])
    deltas = feed(stream, [b"hello S", b"TO", b"P and more"])
    assert "".join(deltas) == "hello " and stream.stopped and stream.text == "hello "


def test_held_back_prefix_is_released_when_it_cannot_become_a_stop():
    stream = TextStream(stop=["</end>"])
    assert feed(stream, [b"a </", b"b"]) == ["a ", "</b"]
    assert not stream.stopped


def test_truncated_character_at_the_end_becomes_replacement_char():
    stream = TextStream()
    stream.push("é".encode()[:1])
    assert stream.finish() == "\ufffd"


def test_joined_deltas_equal_text_without_stops():
    stream = TextStream(stop=["xyz"])
    chunks = [w.encode() for w in ["The ", "x", "y", " z", "ebra ", "xy"]]
    out = "".join(feed(stream, chunks)) + stream.finish()
    assert out == stream.text == "The xy zebra xy"

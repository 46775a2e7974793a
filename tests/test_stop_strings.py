"""Stop sequences found across token boundaries (policies/stop_strings.py)."""

from hypothesis import given, strategies as st

from policies.stop_strings import StopMatcher


def run(pieces, stops):
    matcher = StopMatcher(stops)
    out = "".join(matcher.feed(p) for p in pieces)
    return out + matcher.flush(), matcher.stopped


def test_stop_split_across_pieces_is_never_emitted():
    assert run(["Hello wo", "r", "ld and more"], ["world"]) == ("Hello ", True)


def test_partial_match_that_fails_is_released():
    assert run(["abc wor", "m done"], ["world"]) == ("abc worm done", False)


def test_earliest_of_several_stops_wins():
    assert run(["x END y STOP"], ["STOP", "END"]) == ("x ", True)


def test_nothing_after_stop():
    matcher = StopMatcher(["."])
    assert matcher.feed("a.b") == "a"
    assert matcher.feed("more") == ""
    assert matcher.flush() == ""


@given(st.text(alphabet="ab.", max_size=30), st.lists(st.integers(1, 5), max_size=10))
def test_streaming_equals_whole_text_cut_at_first_stop(text, cuts):
    pieces, rest = [], text
    for cut in cuts:
        pieces.append(rest[:cut])
        rest = rest[cut:]
    pieces.append(rest)
    stop = "ab."
    expected = text.split(stop)[0]
    assert run(pieces, [stop]) == (expected, stop in text)

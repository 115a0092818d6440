from collections.abc import Iterator, Sequence

from workers.engine import Sampling
from workers.textgen import Generation, StopFilter, stream_text


class ScriptedModel:
    """A fake TextModel that 'samples' a fixed list of byte pieces."""

    def __init__(self, pieces: list[bytes], n_ctx: int = 100) -> None:
        self.pieces, self.n_ctx = pieces, n_ctx

    def tokenize(self, text: str, special: bool, add_bos: bool = True) -> list[int]:
        return list(range(len(text.split())))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return ""

    def generate(self, tokens: list[int], sampling: Sampling) -> Iterator[bytes]:
        yield from self.pieces

    def close(self) -> None:
        pass


def run(pieces: list[bytes], stop: tuple[str, ...] = (), max_tokens: int = 50, n_ctx: int = 100):
    gen = Generation(prompt_tokens=3)
    out = list(stream_text(ScriptedModel(pieces, n_ctx), [0, 1, 2],
                           Sampling(max_tokens=max_tokens, stop=stop), gen))
    return out, gen


def test_pieces_concatenate_to_the_text_and_every_token_is_counted():
    out, gen = run([b"Hello", b",", b" world"])
    assert "".join(out) == "Hello, world"
    assert gen.completion_tokens == 3
    assert gen.finish_reason == "stop"


def test_a_multibyte_character_split_across_tokens_comes_out_whole():
    snowman = "☃".encode()
    out, _ = run([b"a", snowman[:1], snowman[1:], b"b"])
    assert "".join(out) == "a☃b"
    assert all("\ufffd" not in piece for piece in out)


def test_generation_stops_at_a_stop_string_split_across_tokens_and_drops_it():
    out, gen = run([b"one", b" END", b"ING", b" never"], stop=("ENDING",))
    assert "".join(out) == "one "
    assert gen.finish_reason == "stop"
    assert gen.completion_tokens == 3


def test_held_back_text_that_turns_out_not_to_be_a_stop_is_released():
    out, _ = run([b"a <", b"b> c"], stop=("<end>",))
    assert "".join(out) == "a <b> c"


def test_max_tokens_ends_generation_with_reason_length():
    out, gen = run([b"x"] * 10, max_tokens=4)
    assert "".join(out) == "xxxx"
    assert (gen.completion_tokens, gen.finish_reason) == (4, "length")


def test_a_full_context_ends_generation_with_reason_length():
    _, gen = run([b"x"] * 10, max_tokens=50, n_ctx=5)
    assert (gen.completion_tokens, gen.finish_reason) == (2, "length")


def test_stop_filter_cuts_at_the_earliest_of_several_stops():
    f = StopFilter(("BB", "A"))
    assert f.feed("xxBBA") == ("xx", True)


def test_a_continued_generation_counts_its_earlier_tokens_against_max_tokens():
    from workers.runners import continued

    model = ScriptedModel([b" c", b" d", b" e", b" f"])
    context, gen = continued(model, [0, 1, 2], "a b")  # two tokens published before a crash
    assert context == [0, 1, 2, 0, 1] and gen.completion_tokens == 2
    out = list(stream_text(model, context, Sampling(max_tokens=4), gen))
    assert out == [" c", " d"] and gen.completion_tokens == 4 and gen.finish_reason == "length"


def test_a_continuation_that_already_reached_max_tokens_samples_nothing():
    from workers.runners import continued

    model = ScriptedModel([b" never"])
    context, gen = continued(model, [0, 1, 2], "a b c")
    assert list(stream_text(model, context, Sampling(max_tokens=3), gen)) == []
    assert gen.finish_reason == "length" and gen.completion_tokens == 3

from collections.abc import Sequence

import pytest

from workers.engine import Sampling, Sink
from workers.textgen import Generation, StopFilter, generate_text


class ScriptedModel:
    """A fake TextModel that 'samples' a fixed list of byte pieces."""

    def __init__(self, pieces: list[bytes], n_ctx: int = 100) -> None:
        self.pieces, self.n_ctx = pieces, n_ctx

    def tokenize(self, text: str, special: bool, add_bos: bool = True) -> list[int]:
        return list(range(len(text.split())))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return ""

    def generate(self, tokens: list[int], sampling: Sampling, sink: Sink) -> None:
        self.fed = 0
        for piece in self.pieces:
            self.fed += 1
            if not sink.feed(piece) or not sink.flush():
                return

    def close(self) -> None:
        pass


def texts(model: ScriptedModel, context: list[int], sampling: Sampling,
          gen: Generation) -> list[str]:
    out: list[str] = []
    generate_text(model, context, sampling, gen, out.append)
    return out


def run(pieces: list[bytes], stop: tuple[str, ...] = (), max_tokens: int = 50, n_ctx: int = 100):
    gen = Generation(prompt_tokens=3)
    out = texts(ScriptedModel(pieces, n_ctx), [0, 1, 2], Sampling(max_tokens=max_tokens, stop=stop),
                gen)
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
    out = texts(model, context, Sampling(max_tokens=4), gen)
    assert out == [" c", " d"] and gen.completion_tokens == 4 and gen.finish_reason == "length"


def test_a_continuation_that_already_reached_max_tokens_samples_nothing():
    from workers.runners import continued

    model = ScriptedModel([b" never"])
    context, gen = continued(model, [0, 1, 2], "a b c")
    assert texts(model, context, Sampling(max_tokens=3), gen) == []
    assert gen.finish_reason == "length" and gen.completion_tokens == 3


class Cancelled(Exception):
    pass


def test_an_error_in_the_sampling_thread_stops_generation_and_is_raised_by_the_caller():
    model = ScriptedModel([b"a", b"b", b"c", b"d"])
    emitted: list[str] = []

    def emit(text: str) -> None:
        if len(emitted) == 2:
            raise Cancelled("cancel requested")
        emitted.append(text)

    with pytest.raises(Cancelled, match="cancel requested"):
        generate_text(model, [0], Sampling(max_tokens=10), Generation(prompt_tokens=1), emit)
    assert emitted == ["a", "b"] and model.fed == 3


def test_settle_runs_after_every_step_and_its_error_stops_generation():
    model = ScriptedModel([b"a", b"b", b"c", b"d"])
    emitted: list[str] = []
    settled = []

    def settle() -> None:
        settled.append(len(emitted))
        if len(settled) == 2:
            raise Cancelled("job gone")

    with pytest.raises(Cancelled, match="job gone"):
        generate_text(model, [0], Sampling(max_tokens=10), Generation(prompt_tokens=1),
                      emitted.append, settle)
    assert settled == [1, 2] and emitted == ["a", "b"] and model.fed == 2


def test_the_last_text_is_settled_before_generation_returns():
    model = ScriptedModel([b"a", "☃".encode()[:2]])  # a cut character: emitted at the end
    emitted: list[str] = []
    settled = []
    generate_text(model, [0], Sampling(max_tokens=10), Generation(prompt_tokens=1),
                  emitted.append, lambda: settled.append(list(emitted)))
    assert emitted == ["a", "\ufffd"] and settled[-1] == ["a", "\ufffd"]


def test_with_send_each_step_is_sent_and_only_the_end_settled():
    """A batch engine's steps send their appends (answers read with the next step's) and
    the generation settles once, at its end."""
    model = ScriptedModel([b"a", b"b", b"c"])
    emitted: list[str] = []
    calls: list[tuple[str, int]] = []
    generate_text(model, [0], Sampling(max_tokens=10), Generation(prompt_tokens=1),
                  emitted.append, lambda: calls.append(("settle", len(emitted))),
                  lambda: calls.append(("send", len(emitted))))
    assert calls == [("send", 1), ("send", 2), ("send", 3), ("settle", 3)]


def test_what_earlier_attempts_published_is_their_text_and_their_log_probabilities():
    from workers.runners import NOTHING, Published

    events = [{"text": "Once", "logprobs": [{"token": "Once", "logprob": -0.1}]},
              {"text": " upon"}, {"text": " a", "logprobs": [{"token": " a", "logprob": -1.0}]}]
    earlier = Published.of(events)
    assert earlier.text == "Once upon a"
    assert [e["token"] for e in earlier.logprobs] == ["Once", " a"]
    assert Published.of([]) == NOTHING

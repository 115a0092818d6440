import pytest

from broker.messages import SummarizeJob
from workers.summarize import Budget, chunk_tokens, map_reduce, summary_instruction


def test_chunks_cover_every_token_in_order_with_the_overlap():
    chunks = chunk_tokens(list(range(25)), size=10, overlap=2)
    assert [c[0] for c in chunks] == [0, 8, 16]
    assert chunks[-1][-1] == 24
    assert all(len(c) <= 10 for c in chunks)
    assert chunks[0][-2:] == chunks[1][:2]


def test_a_text_that_fits_is_one_chunk():
    assert chunk_tokens([1, 2, 3], size=10, overlap=2) == [[1, 2, 3]]


def test_instructions_are_part_of_the_summary_prompt():
    assert "three bullet points" in summary_instruction("three bullet points")
    assert summary_instruction(None).startswith("Summarize the following text.")


def words(text: str) -> list[int]:
    return [len(w) for w in text.split()]


def fake_detokenize(tokens: list[int]) -> str:
    return " ".join("w" * n for n in tokens)


def test_a_long_text_is_mapped_in_parts_then_reduced_and_stages_are_reported():
    job = SummarizeJob(kind="summarize", text="word " * 300, max_tokens=20)
    budget = Budget(n_ctx=200, prompt_overhead=20, max_tokens=20)  # 160 text tokens a call
    stages, calls = [], []

    def once(text: str, max_tokens: int, final: bool) -> str:
        calls.append((len(text.split()), max_tokens, final))
        return "short summary" if final else "part summary " * 5

    summary, parts = map_reduce(job, budget, 8, words, fake_detokenize, once,
                                lambda s, i, n: stages.append((s, i, n)))
    assert summary == "short summary"
    assert parts == 2
    assert stages == [("map", 1, 2), ("map", 2, 2), ("reduce", None, None)]
    assert [c[2] for c in calls] == [False, False, True]
    assert all(c[0] <= budget.text_tokens for c in calls)
    assert calls[0][1] == budget.map_max_tokens


def test_a_short_text_is_summarised_in_a_single_stage():
    job = SummarizeJob(kind="summarize", text="a few words", max_tokens=20)
    stages = []
    summary, parts = map_reduce(job, Budget(200, 20, 20), 8, words, fake_detokenize,
                                lambda t, m, f: "s", lambda s, i, n: stages.append(s))
    assert (summary, parts, stages) == ("s", 1, ["single"])


def test_a_context_too_small_for_any_text_is_an_error():
    job = SummarizeJob(kind="summarize", text="x", max_tokens=100)
    with pytest.raises(ValueError, match="no room"):
        map_reduce(job, Budget(120, 20, 100), 0, words, fake_detokenize,
                   lambda t, m, f: "", lambda s, i, n: None)

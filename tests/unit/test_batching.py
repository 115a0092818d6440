"""The batch engine's scheduling with a fake backend: plans, slots, prefix reuse, cancel."""

from __future__ import annotations

import contextlib
import threading

from workers.batching import (
    BatchEngine,
    Request,
    Slot,
    best_donor,
    plan_batch,
    run_to_end,
)
from workers.engine import Sampling

EOG = 99


class FakeBackend:
    """'Samples' the next integer after the last token of the sequence; EOG after `stop_at`."""

    can_share = True
    prefill_rows = 0

    def __init__(self, stop_at: int = 1000) -> None:
        self.stop_at = stop_at
        self.batches: list[list[tuple[int, int, int, bool]]] = []
        self.last: dict[int, int] = {}
        self.shared: list[tuple[int, int, int]] = []
        self.forgot: list[tuple[int, int]] = []
        self.gate = threading.Event()
        self.gate.set()

    def decode(self, entries):
        self._run(self.batches, entries)

    def _run(self, log, entries):
        self.gate.wait(5)
        log.append(list(entries))
        for i, (token, _, _seq, wants) in enumerate(entries):
            if wants:
                self.last[i] = token

    def sample(self, request, batch_index):
        token = self.last[batch_index] + 1
        return EOG if token >= self.stop_at else token

    def is_eog(self, token):
        return token == EOG

    def piece(self, token):
        return f"<{token}>".encode()

    def forget(self, seq, from_pos):
        self.forgot.append((seq, from_pos))

    def share(self, src, dst, n_tokens):
        self.shared.append((src, dst, n_tokens))


class Collect:
    """A sink that keeps its pieces; says stop after `stop_after` of them."""

    def __init__(self, stop_after: int = 10**6) -> None:
        self.got: list[bytes] = []
        self.stop_after = stop_after

    def feed(self, piece: bytes, logprob: object = None) -> bool:
        self.got.append(piece)
        return len(self.got) < self.stop_after

    def flush(self) -> bool:
        return True


def request(tokens, max_new=3, priority=5, stop_after=10**6):
    return Request(tokens=list(tokens), sampling=Sampling(max_tokens=max_new), max_new=max_new,
                   sink=Collect(stop_after), priority=priority)


def run(engine, r):
    """Run the request to its end; its pieces, joined."""
    run_to_end(engine, r)
    return b"".join(r.sink.got)


def run_together(engine, reqs):
    """Each request's pieces, joined, keyed by its first prompt token; run on threads."""
    results = {}
    threads = [threading.Thread(target=lambda r=r: results.__setitem__(
        r.tokens[0], run(engine, r))) for r in reqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    return results


def seat_together(engine, backend, submit):
    """Call `submit` while the engine holds the decode of a one-token request that goes
    first, so that what it submits is seated at once, in order, in slots 0, 1, ... (the
    first request's batch is dropped from the log)."""
    backend.gate.clear()
    first = engine.submit(request([1], max_new=1))
    while engine.active() == 0:
        threading.Event().wait(0.01)
    n = submit()
    while len(engine._waiting) < n:
        threading.Event().wait(0.01)
    backend.gate.set()
    assert first.out.get(timeout=5) is None and first.sink.got == [b"<2>"]
    del backend.batches[0]


def run_in_order(engine, backend, reqs):
    """Like run_together, but all seated at once, in this order (slots 0, 1, ...)."""
    def submit():
        for r in reqs:
            engine.submit(r)
        return len(reqs)

    seat_together(engine, backend, submit)
    results = {}
    for r in reqs:
        assert r.out.get(timeout=5) is None
        results[r.tokens[0]] = b"".join(r.sink.got)
    return results


def invariant_engine(max_batch, prompt_chunk=128):
    """An InvariantBatchEngine on a fake backend that never reaches EOG."""
    from workers.batching import InvariantBatchEngine

    backend = FakeBackend(stop_at=10**6)
    return backend, InvariantBatchEngine(backend, max_batch=max_batch, n_ctx=1000,
                                         prompt_chunk=prompt_chunk)


def test_decoding_sequences_go_first_and_prompts_share_a_chunk_budget():
    decoding = [Slot(i, request=request([1]), pending=[7]) for i in range(3)]
    joining = Slot(3, request=request(range(300)), pending=list(range(300)))
    other = Slot(4, request=request(range(50)), pending=list(range(50)))
    plan = plan_batch([joining, *decoding, other], n_batch=512, prompt_chunk=128)
    assert [(s.seq, n) for s, n in plan] == [(0, 1), (1, 1), (2, 1), (3, 128)]


def test_the_longest_cached_prefix_is_reused_but_one_prompt_token_is_always_decoded():
    target = Slot(0, cached=[1, 2, 9])
    donor = Slot(1, cached=[1, 2, 3, 4, 5])
    assert best_donor([target, donor], target, [1, 2, 3, 4, 6]) == (donor, 4)
    assert best_donor([target, donor], target, [1, 2, 3, 4, 5]) == (donor, 4)
    assert best_donor([target, donor], target, [1, 2, 9, 9]) == (target, 3)


def test_each_request_gets_its_own_tokens_from_shared_steps():
    backend = FakeBackend()
    engine = BatchEngine(backend, max_batch=4, n_ctx=100)
    try:
        assert run(engine, request([10], max_new=3)) == b"<11><12><13>"
        reqs = [request([10 * i], max_new=3) for i in (2, 3, 4)]
        assert run_together(engine, reqs) == {
            20: b"<21><22><23>", 30: b"<31><32><33>", 40: b"<41><42><43>"}
    finally:
        engine.close()


def test_a_jobs_end_reaches_its_thread_after_its_last_piece_and_the_feeding_overlaps_decodes():
    """The feeder feeds a step's pieces while the engine decodes the next step, and hands a
    job's end out only once its last piece is fed and flushed: nothing reaches a sink after
    its job's thread was told the end."""

    class Watching(FakeBackend):
        def __init__(self):
            super().__init__()
            self.in_decode = threading.Event()
            self.overlapped = 0

        def decode(self, entries):
            self.in_decode.set()
            threading.Event().wait(0.002)  # a decode long enough to be seen
            super().decode(entries)
            self.in_decode.clear()

    backend = Watching()

    class Checked(Collect):
        def __init__(self, req_out):
            super().__init__()
            self.out = req_out

        ended = False  # set by the job's thread once it has the end

        def feed(self, piece, logprob=None):
            assert self.out.empty() and not self.ended, "fed after the end was handed out"
            backend.overlapped += backend.in_decode.is_set()
            return super().feed(piece, logprob)

        def flush(self):
            assert self.out.empty() and not self.ended, "flushed after the end was handed out"
            return True

    def run_and_mark(r):
        run_to_end(engine, r)
        r.sink.ended = True

    engine = BatchEngine(backend, max_batch=4, n_ctx=100)
    try:
        reqs = []
        for i, n in enumerate((1, 2, 5, 9, 3, 7), start=1):
            r = Request(tokens=[10 * i], sampling=Sampling(max_tokens=n), max_new=n, sink=Collect())
            r.sink = Checked(r.out)
            reqs.append(r)
        threads = [threading.Thread(target=run_and_mark, args=(r,)) for r in reqs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(5)
        assert all(r.sink.ended for r in reqs)  # no assertion failed in the feeder
        assert {r.tokens[0]: b"".join(r.sink.got) for r in reqs} == {
            10 * i: b"".join(f"<{10 * i + t}>".encode() for t in range(1, n + 1))
            for i, n in enumerate((1, 2, 5, 9, 3, 7), start=1)}
        assert backend.overlapped > 0  # pieces were fed while a decode ran
    finally:
        engine.close()


def test_a_shared_prompt_prefix_is_copied_from_the_slot_that_holds_it():
    backend = FakeBackend()
    engine = BatchEngine(backend, max_batch=2, n_ctx=100)
    try:
        system = list(range(50, 80))
        assert run(engine, request([*system, 1], max_new=1))
        second = request([*system, 2], max_new=1)
        run(engine, second)
        assert second.reused == len(system)  # the slot's own leftovers, no recompute
        decoded = [e for batch in backend.batches[-1:] for e in batch]
        assert [token for token, *_ in decoded] == [2]
    finally:
        engine.close()


def test_a_sink_that_says_stop_frees_the_slot_for_the_next_request():
    backend = FakeBackend()
    engine = BatchEngine(backend, max_batch=1, n_ctx=100)
    try:
        assert run(engine, request([1], max_new=50, stop_after=1)) == b"<2>"  # cancelled
        assert run(engine, request([5], max_new=2)) == b"<6><7>"
    finally:
        engine.close()


def test_the_most_urgent_waiting_request_is_seated_first():
    backend = FakeBackend()
    backend.gate.clear()  # hold the engine while the queue fills
    engine = BatchEngine(backend, max_batch=1, n_ctx=100)
    try:
        running = engine.submit(request([1], max_new=1))
        low = engine.submit(request([100], max_new=1, priority=1))
        high = engine.submit(request([200], max_new=1, priority=9))
        backend.gate.set()
        for r in (running, low, high):
            assert r.out.get(timeout=5) is None
        order = [batch[0][0] for batch in backend.batches]
        assert order.index(200) < order.index(100)
    finally:
        engine.close()


def test_a_request_waits_for_a_long_prefix_another_slot_is_still_decoding():
    backend = FakeBackend()
    engine = BatchEngine(backend, max_batch=2, n_ctx=1000, prompt_chunk=16)
    try:
        system = list(range(100, 180))
        first, second = request([*system, 1], max_new=1), request([*system, 2], max_new=1)
        engine.submit(first)
        engine.submit(second)
        for r in (first, second):
            assert r.out.get(timeout=5) is None
        assert second.reused == len(system)  # shared, not computed twice
        decoded = sum(len(batch) for batch in backend.batches)
        assert decoded == len(system) + 2  # the shared prefix once, then each tail token
    finally:
        engine.close()


def rows_per_seq(batch):
    counts = {}
    for *_, seq, _wants in batch:
        counts[seq] = counts.get(seq, 0) + 1
    return counts


def is_decode_step(batch):
    return set(rows_per_seq(batch).values()) == {1}


def test_an_invariant_engine_decodes_one_run_of_sequences_and_prompt_chunks_apart():
    from workers.batching import FA_TILE_ROWS

    backend, engine = invariant_engine(4, 128)
    try:
        assert engine.prompt_chunk == 128  # rows of prompts a step may decode in all
        long_prompt = list(range(1000, 1100))
        reqs = [request([10, 11], max_new=8), request([20, 21], max_new=1),
                request([30, 31], max_new=8), request(long_prompt, max_new=2)]
        got = run_in_order(engine, backend, reqs)
        assert got[10] == b"".join(f"<{t}>".encode() for t in range(12, 20))
        assert got[20] == b"<22>" and got[1000] == b"<1100><1101>"
        for batch in backend.batches:
            seqs = [seq for *_, seq, _ in batch]
            if is_decode_step(batch):  # one consecutive run of sequences, one row each
                assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), batch
            else:  # prompt chunks: a consecutive run of sequences, as many rows from each,
                # at most 63 (from 64 rows of one sequence attention is tiled), 128 in all
                rows = rows_per_seq(batch)
                assert sorted(rows) == list(range(min(rows), max(rows) + 1)), batch
                assert len(set(rows.values())) == 1 and 2 <= len(batch) <= 128, batch
                assert max(rows.values()) < FA_TILE_ROWS, batch
        prompts = [rows_per_seq(b) for b in backend.batches if not is_decode_step(b)]
        # the four prompts joined together: one decode, the shortest prompt's 2 rows from each
        assert prompts[0] == {0: 2, 1: 2, 2: 2, 3: 2}
        # the rest of the long prompt went in chunks of at most 63 rows, never in one
        # 98-row decode
        assert [p[3] for p in prompts[1:]] == [63, 35]
        # once slot 1's job ended, steps between slots 0 and 2 decoded a dummy there
        gap_steps = [b for b in backend.batches if is_decode_step(b)
                     and [(seq, wants) for *_, seq, wants in b][:3] == [(0, True), (1, False),
                                                                      (2, True)]]
        assert gap_steps and (1, 2) in backend.forgot  # the dummy at slot 1's next cell
    finally:
        engine.close()


def test_an_invariant_engine_gives_a_lone_row_a_neighbour_only_past_256_cells():
    from workers.batching import LONE_ROW_CELLS

    backend, engine = invariant_engine(1, 63)
    try:
        assert engine.n_seq == 2  # a spare sequence for the neighbour
        short = request([5, 6], max_new=3)
        assert run_together(engine, [short]) == {5: b"<7><8><9>"}
        assert all(len(b) == 1 for b in backend.batches if is_decode_step(b))
        backend.batches.clear()
        start = LONE_ROW_CELLS - 2
        long = request(list(range(2000, 2000 + start)), max_new=4)
        assert run_together(engine, [long])[2000] == b"".join(
            f"<{2000 + start + i}>".encode() for i in range(4))
        decodes = [b for b in backend.batches if is_decode_step(b)]
        # the prompt's chunks (63 x 4, then 2) give the first token; then the tokens at
        # positions 254 and 255 decode alone, and the one at 256 beside a dummy of seq 1
        assert [len(b) for b in decodes] == [1, 1, 2]
        assert decodes[-1][1] == (0, 0, 1, False) and (1, 0) in backend.forgot
    finally:
        engine.close()


class RecordingSink:
    """Keeps its pieces; says stop after `stop_after` pieces, or at its `flush_stops`-th flush."""

    def __init__(self, log: list[tuple[str, str, int]], name: str, stop_after: int = 100,
                 flush_stops: int = 0) -> None:
        self.log, self.name, self.stop_after, self.flush_stops = log, name, stop_after, flush_stops
        self.got: list[bytes] = []
        self.thread = ""

    def feed(self, piece: bytes, logprob: object = None) -> bool:
        self.thread = threading.current_thread().name
        self.got.append(piece)
        self.log.append(("feed", self.name, len(self.got)))
        return len(self.got) < self.stop_after

    def flush(self) -> bool:
        self.log.append(("flush", self.name, len(self.got)))
        return len(self.got) != self.flush_stops


def run_sinks(engine, backend, reqs):
    """Run the requests (with sinks) on threads, all seated at once."""
    threads = [threading.Thread(target=run_to_end, args=(engine, r)) for r in reqs]

    def submit():
        for t in threads:
            t.start()
        return len(reqs)

    seat_together(engine, backend, submit)
    for t in threads:
        t.join(5)
        assert not t.is_alive()


def test_sinks_take_their_pieces_in_the_feeder_thread_and_flush_once_a_step_after_all_fed():
    backend, log = FakeBackend(), []
    engine = BatchEngine(backend, max_batch=4, n_ctx=100)
    a, b = RecordingSink(log, "a"), RecordingSink(log, "b")
    try:
        run_sinks(engine, backend, [
            Request(tokens=[10], sampling=Sampling(max_tokens=2), max_new=2, sink=a),
            Request(tokens=[20], sampling=Sampling(max_tokens=2), max_new=2, sink=b)])
    finally:
        engine.close()
    assert a.got == [b"<11>", b"<12>"] and b.got == [b"<21>", b"<22>"]
    assert a.thread == b.thread == "batch-feeder"
    steps = [sorted(log[i:i + 4]) for i in range(0, len(log), 4)]  # feed, feed, flush, flush
    assert steps == [[("feed", "a", n), ("feed", "b", n), ("flush", "a", n), ("flush", "b", n)]
                     for n in (1, 2)]
    assert [kind for kind, _, _ in log] == ["feed", "feed", "flush", "flush"] * 2


def test_a_sink_that_says_stop_at_feed_or_flush_frees_its_slot_after_the_next_decode():
    backend, log = FakeBackend(), []
    engine = BatchEngine(backend, max_batch=4, n_ctx=100)
    stop_feed = RecordingSink(log, "feed", stop_after=2)
    stop_flush = RecordingSink(log, "flush", flush_stops=3)
    runs_on = RecordingSink(log, "on")
    try:
        run_sinks(engine, backend, [
            Request(tokens=[t], sampling=Sampling(max_tokens=6), max_new=6, sink=sink)
            for t, sink in ((10, stop_feed), (20, stop_flush), (30, runs_on))])
        assert engine.active() == 0
    finally:
        engine.close()
    assert (len(stop_feed.got), len(stop_flush.got), len(runs_on.got)) == (2, 3, 6)
    rows = [sorted(seq for _, _, seq, _ in batch) for batch in backend.batches]
    # each leaves one decode after its last piece (fed while that decode ran), never sampled
    # there again: its sink got no more
    assert rows == [[0, 1, 2]] * 3 + [[1, 2]] + [[2]] * 2


def test_prompts_of_a_run_go_as_many_whole_chunks_as_fit_and_a_gap_splits_the_run():
    from workers.batching import InvariantBatchEngine, consecutive_runs

    slots = [Slot(seq) for seq in (0, 1, 2, 4, 5, 7)]
    assert [[s.seq for s in run] for run in consecutive_runs(slots)] == [[0, 1, 2], [4, 5], [7]]
    backend = FakeBackend(stop_at=10**6)
    engine = InvariantBatchEngine(backend, max_batch=6, n_ctx=1000, prompt_chunk=63)
    try:
        reqs = [request(range(100 * i, 100 * i + 12), max_new=2) for i in range(1, 7)]
        got = run_in_order(engine, backend, reqs)
        assert got == {100 * i: f"<{100 * i + 12}><{100 * i + 13}>".encode()
                       for i in range(1, 7)}
        prompts = [rows_per_seq(b) for b in backend.batches if not is_decode_step(b)]
        # 63 rows hold five whole 12-token prompts; the sixth goes in the next step
        assert prompts == [{seq: 12 for seq in range(5)}, {5: 12}]
    finally:
        engine.close()


def test_an_invariant_engine_joins_prompts_past_63_rows_and_decodes_them_in_the_same_step():
    backend, engine = invariant_engine(8, 128)
    try:
        reqs = [request(range(100 * i, 100 * i + 15), max_new=3) for i in range(1, 9)]
        got = run_in_order(engine, backend, reqs)
        assert got == {100 * i: b"".join(f"<{100 * i + t}>".encode() for t in (15, 16, 17))
                       for i in range(1, 9)}
        # eight 15-token prompts: 120 rows, 15 from each sequence, in one decode; then, in
        # the same step, the decode of every sequence whose prompt it finished
        assert rows_per_seq(backend.batches[0]) == {seq: 15 for seq in range(8)}
        assert is_decode_step(backend.batches[1])
        assert [seq for *_, seq, _ in backend.batches[1]] == list(range(8))
        assert len(backend.batches) == 3  # the prompts' decode, then two decode steps
    finally:
        engine.close()


def test_jobs_seated_while_a_prompt_decodes_have_theirs_decoded_before_the_decode_step():
    backend, engine = invariant_engine(4, 128)
    try:
        backend.gate.clear()  # the first job's prompt decode holds until the others wait
        first = engine.submit(request(range(100, 110), max_new=2))
        while engine.active() == 0:
            threading.Event().wait(0.01)
        rest = [engine.submit(request(range(t, t + 10), max_new=2)) for t in (200, 300)]
        while len(engine._waiting) < 2:
            threading.Event().wait(0.01)
        backend.gate.set()
        for r in (first, *rest):
            assert r.out.get(timeout=5) is None
        assert [r.sink.got for r in (first, *rest)] == [
            [f"<{t + 10}>".encode(), f"<{t + 11}>".encode()] for t in (100, 200, 300)]
        # its prompt, then theirs joined (in the same step's budget), then one decode step
        # for all three: their first tokens did not wait for a decode step of its own
        assert [rows_per_seq(b) for b in backend.batches[:2]] == [{0: 10}, {1: 10, 2: 10}]
        assert [seq for *_, seq, _ in backend.batches[2]] == [0, 1, 2]
    finally:
        engine.close()


class PrefillBackend(FakeBackend):
    """A fake backend with a prefill context: its decodes go to `prefills`, the copies of
    cells between the contexts to `copies`."""

    prefill_rows = 4

    def __init__(self) -> None:
        super().__init__(stop_at=10**6)
        self.prefills: list[list[tuple[int, int, int, bool]]] = []
        self.copies: list[tuple[str, int, int]] = []

    def prefill(self, entries):
        self._run(self.prefills, entries)

    def to_prefill(self, seq):
        self.copies.append(("to", seq, -1))

    def forget_prefill(self, seq, from_pos):
        self.copies.append(("forget", seq, from_pos))

    def from_prefill(self, seq, n_tokens):
        self.copies.append(("from", seq, n_tokens))


@contextlib.contextmanager
def prefill_engine(max_batch, prompt_chunk=128):
    """An InvariantBatchEngine on a PrefillBackend, closed at the end of the block."""
    from workers.batching import InvariantBatchEngine

    backend = PrefillBackend()
    engine = InvariantBatchEngine(backend, max_batch=max_batch, n_ctx=1000,
                                  prompt_chunk=prompt_chunk)
    try:
        yield backend, engine
    finally:
        engine.close()


def test_prompts_go_to_the_prefill_context_in_whole_groups_of_rows_padded_past_their_end():
    with prefill_engine(8) as (backend, engine):
        reqs = [request(range(100 * i, 100 * i + 15), max_new=3) for i in range(1, 9)]
        got = run_in_order(engine, backend, reqs)
        assert got == {100 * i: b"".join(f"<{100 * i + t}>".encode() for t in (15, 16, 17))
                       for i in range(1, 9)}
        # eight 15-token prompts, each padded to 16 rows, in one prefill decode
        [prompts] = backend.prefills[-1:]
        assert rows_per_seq(prompts) == {seq: 16 for seq in range(8)}
        for seq in range(8):
            rows = [(pos, wants) for _, pos, s, wants in prompts if s == seq]
            assert [pos for pos, _ in rows] == list(range(16))  # the padding: position 15
            assert [pos for pos, wants in rows if wants] == [14]  # the prompt's last token
        # their cells were copied to the main context, which only decodes sampled tokens
        assert [c for c in backend.copies if c[0] == "from"] == [("from", s, 15) for s in range(8)]
        assert all(is_decode_step(b) for b in backend.batches)
        assert [seq for *_, seq, _ in backend.batches[0]] == list(range(8))
        assert [pos for _, pos, *_ in backend.batches[0]] == [15] * 8


def test_a_long_prompt_is_prefilled_in_chunks_of_whole_groups_below_the_attention_tiles():
    with prefill_engine(2) as (backend, engine):
        r = request(range(1000, 1150), max_new=2)
        assert run(engine, r) == b"<1150><1151>"
        assert [len(b) for b in backend.prefills] == [60, 60, 32]  # 150 rows and 2 padding
        positions = [pos for b in backend.prefills for _, pos, *_ in b]
        assert positions == list(range(152))
        assert backend.copies[-1] == ("from", 0, 150)


def test_a_last_prompt_token_left_alone_by_the_budget_is_still_prefilled():
    with prefill_engine(2, prompt_chunk=8) as (backend, engine):
        r = request(range(1000, 1009), max_new=1)  # 9 tokens: 8 rows, then 1 and padding
        assert run(engine, r) == b"<1009>"
        assert [[(t, pos, wants) for t, pos, _, wants in b] for b in backend.prefills][1] == [
            (1008, 8, True), (1008, 9, False), (1008, 10, False), (1008, 11, False)]
        assert backend.batches == []  # the main context decoded none of the prompt


def test_with_a_prefill_context_only_prompt_cells_are_reused_and_two_tokens_are_left():
    with prefill_engine(2) as (backend, engine):
        first = request(range(1, 11), max_new=3)
        assert run(engine, first) == b"<11><12><13>"
        # the slot holds the prompt (prefilled) and 11 and 12 (decoded by the main context):
        # a prompt that goes on with them reuses only the prompt's cells, which the prefill
        # context still holds for that slot
        again = request([*range(1, 14), 50, 51], max_new=1)
        assert run(engine, again) == b"<52>"
        assert again.reused == 10
        assert backend.copies[-2] == ("forget", 0, 10)
        assert [pos for _, pos, *_ in backend.prefills[-1]] == list(range(10, 18))
        # the same prompt again: all but its last two tokens are reused
        same = request([*range(1, 14), 50, 51], max_new=1)
        assert run(engine, same) == b"<52>"
        assert same.reused == 13

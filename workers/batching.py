"""Continuous batching: one resident llama.cpp context decodes every active job in one step.

The worker's task threads (one per Celery slot, `max_batch` of them) each submit a request and
wait for its end; one engine thread owns the model and loops:

1. seat waiting requests (most urgent first) in free slots, reusing the longest cached prefix
   any slot holds (a slot's own leftovers, or another slot's by sharing its KV cells: system
   prompts, summary instructions);
2. plan one batch: one token for every decoding sequence first, then prompt chunks of joining
   sequences up to `prompt_chunk_tokens`, so a long prompt never stalls the others for long;
3. one `llama_decode` for the whole batch, then each finished prompt or decoding sequence
   samples its next token with its own sampler chain (sampling parameters, seed, penalties).

A step's sampled pieces go to their requests' sinks (`Sink`: the job's text and event writer)
in one feeder thread (`Feeder`), while the engine thread runs the next decode (llama.cpp
releases the GIL): each sink queues its token's Redis append, and once every piece of the step
is fed, the first sink's flush sends all of the step's appends in one round trip, whose answers
are read with the next step's (broker/groupcommit.py). Then the feeder hands the step's ends
(and errors) to their task threads, so a job's end always follows its last piece. A sink that
says stop (a stop string, a cancel) frees its slot when the engine collects the step's
verdicts, after the next decode: a stopped job decodes one token more, never sampled. One
handoff per step, not one thread wakeup per token in each job's thread (measured with `python
-m bench.roundtrips`: 131 µs of client CPU per token that way, 22 µs from one thread). Fed in
the engine thread, between decodes, the sinks and their Redis client took about 5% of a step at
a GPU's step time (docs/gpu.md).

`InvariantBatchEngine` (a model's `batch_invariant`, the default) keeps each step to shapes
whose arithmetic per row does not depend on the other rows, so a job's tokens do not depend on
its company. Planning and slot choice are plain functions over token lists, tested with a fake
backend.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from workers.engine import Sampling, Sink, TokenLogprob

log = logging.getLogger("tokenpool.batching")

END = None  # what a request's queue gets when it ends without an error
SHARED_PREFIX_MIN = 32  # tokens of a coming shared prefix worth waiting for


class Backend(Protocol):
    """The few llama.cpp operations the engine needs (a fake implements them in tests)."""

    can_share: bool  # whether one sequence can take another's cells (a unified KV cache)

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """Decode (token, pos, seq, wants logits) entries in one batch."""
        ...

    def sample(self, request: Request, batch_index: int) -> int: ...

    def logprob(self, batch_index: int, token: int, top: int) -> TokenLogprob:
        """The sampled token's log-probability in row `batch_index`, and the `top` likeliest."""
        ...

    def is_eog(self, token: int) -> bool: ...

    def piece(self, token: int) -> bytes: ...

    def forget(self, seq: int, from_pos: int) -> None:
        """Drop a sequence's cached cells from `from_pos` on."""
        ...

    def share(self, src: int, dst: int, n_tokens: int) -> None:
        """Make `dst` hold `src`'s first `n_tokens` cells (no recompute)."""
        ...

    # A prefill context (`InvariantBatchEngine` only; `prefill_rows` 0: none): a second
    # context whose faster kernels compute every prompt row, in whole groups of
    # `prefill_rows` rows per sequence, and whose cells are then copied to the main one.
    prefill_rows: int

    def prefill(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """Decode entries in the prefill context (`sample` then reads its logits)."""
        ...

    def to_prefill(self, seq: int) -> None:
        """Make the prefill context's `seq` hold the main context's cells of `seq`."""
        ...

    def forget_prefill(self, seq: int, from_pos: int) -> None: ...

    def from_prefill(self, seq: int, n_tokens: int) -> None:
        """Make the main context's `seq` hold the prefill context's first `n_tokens` cells."""
        ...


@dataclass(eq=False)
class Request:
    tokens: list[int]  # the whole prompt (a continued job: prompt + its published tokens)
    sampling: Sampling
    max_new: int  # tokens it may still sample
    sink: Sink  # takes the sampled pieces, in the engine thread
    priority: int = 5
    out: queue.SimpleQueue[Exception | None] = field(default_factory=queue.SimpleQueue)  # end
    sampler: object | None = None  # the backend's sampler chain, made when seated
    sampled: int = 0
    reused: int = 0  # prompt tokens found in the cache


# A sampled piece on its way to its sink: the slot it was sampled in, the request, its bytes
# and log-probabilities; a request's end (None, or its error) on its way to its task thread;
# a sink's verdict: it said stop (with the error a sink raised, if it raised).
Fed = tuple["Slot", Request, bytes, TokenLogprob | None]
Ended = tuple[Request, Exception | None]
Verdict = tuple["Slot", Request, Exception | None]


class Feeder:
    """The thread that feeds a step's pieces to their sinks, flushes them, then hands out the
    step's ends, while the engine decodes the next step; the engine collects the sinks'
    verdicts before it samples that step."""

    def __init__(self) -> None:
        self._work: queue.SimpleQueue[tuple[list[Fed], list[Ended]] | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[list[Verdict]] = queue.SimpleQueue()
        self._handed = 0  # batches handed and not yet collected (engine thread only)
        self._thread = threading.Thread(target=self._run, name="batch-feeder", daemon=True)
        self._thread.start()

    def hand(self, fed: list[Fed], ended: list[Ended]) -> None:
        if fed or ended:
            self._work.put((fed, ended))
            self._handed += 1

    @property
    def busy(self) -> bool:
        return self._handed > 0

    def collect(self) -> list[Verdict]:
        """Wait until everything handed is fed and handed out; the sinks that said stop."""
        verdicts: list[Verdict] = []
        while self._handed:
            verdicts += self._done.get()
            self._handed -= 1
        return verdicts

    def close(self) -> None:
        self._work.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while (work := self._work.get()) is not None:
            verdicts: list[Verdict] = []
            try:
                verdicts = feed(*work)
            except Exception:  # a bug here: the engine must not wait for ever
                log.exception("feeding a step's pieces failed")
            self._done.put(verdicts)


def feed(fed: list[Fed], ended: list[Ended]) -> list[Verdict]:
    """Feed each piece to its sink (none after its sink said stop), flush each sink fed once,
    then put each end in its request's queue (a sink's own error, if it raised, with it)."""
    stopped: dict[Request, Verdict] = {}
    try:
        for slot, request, piece, logprob in fed:
            if request in stopped:
                continue
            try:
                if not request.sink.feed(piece, logprob):
                    stopped[request] = (slot, request, None)
            except Exception as exc:  # a sink keeps its own errors; this is a bug in one
                stopped[request] = (slot, request, exc)
        for slot, request in {(slot, request): None for slot, request, _, _ in fed}:
            try:
                if not request.sink.flush():
                    stopped.setdefault(request, (slot, request, None))
            except Exception as exc:
                stopped[request] = (slot, request, exc)
    finally:  # whatever happened, every end is handed out: no job thread waits for ever
        for request, error in ended:
            raised = stopped[request][2] if request in stopped else None
            request.out.put(error if error is not None else raised)
    return list(stopped.values())


@dataclass(eq=False)
class Slot:
    seq: int
    cached: list[int] = field(default_factory=list)  # tokens whose cells this seq holds
    request: Request | None = None
    pending: list[int] = field(default_factory=list)  # tokens still to decode
    # With a prefill context (InvariantBatchEngine): prompt tokens decoded there, not yet
    # copied here; how many of `cached` it holds; how many of `cached` were computed there
    # (prompt tokens: sampled ones were decoded here).
    prefilled: list[int] = field(default_factory=list)
    mirrored: int = 0
    prompted: int = 0

    @property
    def decoding(self) -> bool:
        """Its next decode is one sampled token (or a prompt's last, without a prefill)."""
        return self.request is not None and len(self.pending) == 1 and not self.prefilled

    @property
    def prompting(self) -> bool:
        return self.request is not None and (len(self.pending) > 1 or bool(self.prefilled))


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def best_donor(slots: Sequence[Slot], target: Slot, tokens: Sequence[int], keep: int = 1,
               reusable: Callable[[Slot], int] | None = None) -> tuple[Slot, int]:
    """The slot whose cached tokens share the longest prefix with `tokens` (the target's own
    cache wins ties: it needs no copy). At least `keep` prompt tokens are always left to
    decode (one: its logits give the first sampled token); `reusable` says how many of a
    slot's cached tokens may be taken (all of them by default)."""
    limit = max(0, len(tokens) - keep)

    def reuse(slot: Slot) -> int:
        cached = slot.cached if reusable is None else slot.cached[:reusable(slot)]
        return min(common_prefix(cached, tokens), limit)

    best, best_n = target, reuse(target)
    for slot in slots:
        n = reuse(slot)
        if n > best_n:
            best, best_n = slot, n
    return best, best_n


def plan_batch(slots: Sequence[Slot], n_batch: int, prompt_chunk: int) -> list[tuple[Slot, int]]:
    """(slot, how many of its pending tokens) for one decode: decoders first, then prompts."""
    plan: list[tuple[Slot, int]] = []
    budget = n_batch
    for slot in slots:
        if slot.decoding and budget > 0:
            plan.append((slot, 1))
            budget -= 1
    chunk_budget = min(budget, prompt_chunk)
    for slot in slots:
        if slot.prompting and chunk_budget > 0:
            take = min(len(slot.pending), chunk_budget)
            plan.append((slot, take))
            chunk_budget -= take
    return plan


class BatchEngine:
    """Owns the backend; task threads call `submit` and read the request's queue."""

    def __init__(self, backend: Backend, max_batch: int, n_ctx: int, n_batch: int = 512,
                 prompt_chunk: int = 128) -> None:
        self.backend, self.n_ctx = backend, n_ctx
        self.n_batch, self.prompt_chunk = n_batch, prompt_chunk
        self.slots = [Slot(seq) for seq in range(max_batch)]
        self._waiting: list[tuple[int, int, Request]] = []
        self._order = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.steps = 0
        self._outbox: list[Ended] = []  # ends of this step, handed out after its pieces
        self._fed: list[Fed] = []  # pieces sampled this step, for the feeder
        self._feeder = Feeder()
        self._thread = threading.Thread(target=self._loop, name="batch-engine", daemon=True)
        self._thread.start()

    @staticmethod
    def sequences(max_batch: int) -> int:
        """KV sequences the backend needs: one per slot."""
        return max_batch

    def submit(self, request: Request) -> Request:
        with self._lock:
            heapq.heappush(self._waiting, (-request.priority, next(self._order), request))
        self._wake.set()
        return request

    def active(self) -> int:
        return sum(slot.request is not None for slot in self.slots)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    # --- the engine thread ---

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._seat_waiting()
            plan = plan_batch(self.slots, self.n_batch, self.prompt_chunk)
            if not plan:
                self._idle()
                continue
            try:
                self._step(plan)
            except Exception as exc:  # a failed decode fails the jobs in it, not the engine
                self._fail([slot for slot, _ in plan], exc)
        self._drain()
        self._feeder.close()

    def _idle(self) -> None:
        """Nothing to decode: feed the last step's pieces, hand out its ends, wait for work."""
        self._drain()
        self._wake.wait(0.05)
        self._wake.clear()

    def _fail(self, slots: list[Slot], exc: Exception) -> None:
        log.exception("decode step failed")
        for slot in slots:
            self._finish(slot, exc)
        self._drain()

    def _hand(self) -> None:
        """The step's pieces and ends to the feeder, which works while the next decode runs."""
        fed, self._fed = self._fed, []
        outbox, self._outbox = self._outbox, []
        self._feeder.hand(fed, outbox)

    def _collect(self) -> None:
        """Once the feeder is done: free the slots whose sinks said stop."""
        for slot, request, error in self._feeder.collect():
            if slot.request is request:
                self._finish(slot, error)

    def _drain(self) -> None:
        """Everything sampled fed, every end handed out."""
        while self._fed or self._outbox or self._feeder.busy:
            self._hand()
            self._collect()

    def _decode(self, entries: list[tuple[int, int, int, bool]], prefill: bool = False) -> None:
        self._hand()  # fed while llama.cpp computes, GIL released
        (self.backend.prefill if prefill else self.backend.decode)(entries)
        self.steps += 1

    def _seat_waiting(self) -> int:
        """Seat waiting requests in free slots, most urgent first; how many were seated."""
        deferred, seated = [], 0
        with self._lock:
            while self._waiting and any(s.request is None for s in self.slots):
                entry = heapq.heappop(self._waiting)
                if self._prefix_coming(entry[2]):
                    deferred.append(entry)
                else:
                    self._seat(entry[2])
                    seated += 1
            for entry in deferred:
                heapq.heappush(self._waiting, entry)
        return seated

    def _prefix_coming(self, request: Request) -> bool:
        """Another slot is still decoding a prompt that shares a long prefix with this one:
        wait for its cells rather than compute the same prefix twice."""
        if not self.backend.can_share:
            return False
        for slot in self.slots:
            if slot.request is None or not slot.pending:
                continue
            cached = common_prefix(slot.cached, request.tokens)
            planned = common_prefix(slot.cached + slot.prefilled + slot.pending, request.tokens)
            if planned >= SHARED_PREFIX_MIN and planned > cached:
                return True
        return False

    def _seat(self, request: Request) -> None:
        free = [s for s in self.slots if s.request is None]
        # Prefer a free slot whose own cache matches best, then any donor's cells.
        target = max(free, key=lambda s: common_prefix(s.cached, request.tokens))
        donors = self.slots if self.backend.can_share else [target]
        donor, n = self._donor(donors, target, request.tokens)
        if donor is target:
            self.backend.forget(target.seq, n)
            target.mirrored = min(target.mirrored, n)
        else:
            self.backend.forget(target.seq, 0)
            self.backend.share(donor.seq, target.seq, n)
            target.mirrored = 0
        target.cached = list(request.tokens[:n])
        target.prompted = n
        target.pending = list(request.tokens[n:])
        target.request = request
        request.reused = n
        request.sampler = None

    def _donor(self, slots: Sequence[Slot], target: Slot,
               tokens: Sequence[int]) -> tuple[Slot, int]:
        return best_donor(slots, target, tokens)

    def _step(self, plan: list[tuple[Slot, int]]) -> None:
        entries: list[tuple[int, int, int, bool]] = []
        outputs: list[tuple[Slot, int]] = []
        for slot, take in plan:
            chunk = slot.pending[:take]
            last = take == len(slot.pending)
            for i, token in enumerate(chunk):
                wants = last and i == take - 1
                if wants:
                    outputs.append((slot, len(entries)))
                entries.append((token, len(slot.cached) + i, slot.seq, wants))
            slot.cached.extend(chunk)
            slot.pending = slot.pending[take:]
        self._decode(entries)
        self._sample_outputs(outputs)

    def _sample_outputs(self, outputs: list[tuple[Slot, int]]) -> None:
        self._collect()  # the step before's verdicts: a stopped job samples no more
        for slot, index in outputs:
            self._sample(slot, index)

    def _sample(self, slot: Slot, index: int) -> None:
        request = slot.request
        if request is None:  # its sink said stop while this step decoded
            return
        token = self.backend.sample(request, index)
        request.sampled += 1
        if self.backend.is_eog(token):
            self._finish(slot, None)
            return
        top = request.sampling.logprobs
        try:
            logprob = None if top is None else self.backend.logprob(index, token, top)
            self._fed.append((slot, request, self.backend.piece(token), logprob))
        except Exception as exc:
            self._finish(slot, exc)
            return
        if request.sampled >= request.max_new or len(slot.cached) + 1 >= self.n_ctx:
            self._finish(slot, None)
            return
        slot.pending = [token]

    def _finish(self, slot: Slot, error: Exception | None) -> None:
        request = slot.request
        if request is None:
            return
        slot.pending = []  # tokens never decoded are not in the cache
        slot.prefilled = []  # nor those the prefill context holds, never copied here
        self._outbox.append((request, error if error is not None else END))
        slot.request = None


def consecutive_runs(slots: list[Slot]) -> list[list[Slot]]:
    """Slots (in seq order) grouped into runs of consecutive sequence ids."""
    runs: list[list[Slot]] = []
    for slot in slots:
        if runs and runs[-1][-1].seq + 1 == slot.seq:
            runs[-1].append(slot)
        else:
            runs.append([slot])
    return runs


def whole(n: int, rows: int) -> int:
    """`n` rounded up to whole groups of `rows` (0: as it is)."""
    return -(-n // rows) * rows if rows else n


def run_to_end(engine: BatchEngine, request: Request) -> None:
    """Run a request (its pieces go to its sink); returns when it ends, raises its error."""
    engine.submit(request)
    end = request.out.get()
    if isinstance(end, Exception):
        raise end


FA_TILE_ROWS = 64  # from this many rows per sequence llama.cpp's CPU attention is tiled
# llama.cpp pads a KV stream's length to 256 cells; a lone row attending to 512 or more (a
# sequence past position 255: in a stream of its own, a token's cell is its position) takes
# its split-KV attention, which adds up differently.
LONE_ROW_CELLS = 256


class InvariantBatchEngine(BatchEngine):
    """Batch-invariant decoding: a job's tokens do not depend on the other jobs in the batch.

    It runs on a backend whose kernels give every row the same arithmetic whatever the
    number of rows (`LlamaBackend(invariant=True)`: no repacked weights, no tiled K-quant
    matmul, one KV stream per sequence, whose cells stay in position order). What is left
    are llama.cpp's row-count-dependent paths, which the steps here never take:

    - a decode step is one ubatch: a row for every sequence from the lowest to the highest
      decoding one (a gap, an idle or prompting slot, decodes a dummy token that is dropped
      again), and never a lone row past `LONE_ROW_CELLS` (that would take llama.cpp's
      split-KV attention): such a decoder gets a dummy neighbour;
    - prompt chunks are decodes apart from the decode step, each of one run of consecutive
      sequences with as many rows from each, 2 to `FA_TILE_ROWS - 1` rows per sequence (from
      64 rows of one sequence llama.cpp tiles the attention), `prompt_chunk` rows in all per
      step. They go before the step's decode, which the jobs whose prompts they finish then
      join at once (as llama-server puts prompts and decoding rows in one batch).

    Shared prefixes are copied between KV streams (`share`), not recomputed.

    With a prefill context (`backend.prefill_rows`, 4 on the CPU): a second llama.cpp context
    on the same weights repacked (the kernels llama-server's prompts run on) computes every
    prompt token, and only those. Repacked weights multiply whole groups of 4 rows with one
    kernel and the rows left over with another, so each job's chunk is a whole number of
    groups: a prompt's last chunk is padded with dummy rows past its end, dropped again, and
    its last row's logits give the first token there. The cells are then copied to the main
    context, which decodes the sampled tokens. A prompt token's cell is thus the same
    whoever else prompts beside it, and a reused prefix is reused only as far as prompt
    tokens go (a sampled token's cell, from the main context, would differ from what a
    prompt computes), with at least two tokens left to prefill.
    """

    def __init__(self, backend: Backend, max_batch: int, n_ctx: int, n_batch: int = 512,
                 prompt_chunk: int = 128) -> None:
        super().__init__(backend, max_batch, n_ctx, n_batch, max(2, prompt_chunk))
        self.n_seq = self.sequences(max_batch)

    @staticmethod
    def sequences(max_batch: int) -> int:
        """KV sequences the backend needs: one per slot, and a spare so that a lone decoding
        row always has a neighbour."""
        return max(2, max_batch)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._seat_waiting()
            budget, prompted = self.prompt_chunk, False
            while budget >= 2:  # jobs seated while prompts decode join this step's budget
                prompting = [s for s in self.slots if s.prompting]
                if not prompting:
                    break
                prompted = True
                try:
                    budget = self._prompt_steps(prompting, budget)
                except Exception as exc:
                    self._fail(prompting, exc)
                    break
                if not self._seat_waiting():
                    break
            decoding = [s for s in self.slots if s.decoding]
            if decoding:
                try:
                    self._decode_step(decoding)
                except Exception as exc:
                    self._fail(decoding, exc)
            elif not prompted:
                self._idle()
        self._drain()
        self._feeder.close()

    def _donor(self, slots: Sequence[Slot], target: Slot,
               tokens: Sequence[int]) -> tuple[Slot, int]:
        if not self.backend.prefill_rows:
            return best_donor(slots, target, tokens)
        return best_donor(slots, target, tokens, keep=2, reusable=lambda slot: slot.prompted)

    def _prompt_steps(self, active: list[Slot], budget: int) -> int:
        """Prompt chunks within the step's budget: a decode for each run of consecutive
        prompting sequences, as many rows from each (llama.cpp cuts a batch of several KV
        streams into parts of equal rows per stream), as many of the run as whole chunks of
        the shortest fit; a lone sequence takes all it can; with a prefill context, in whole
        groups of its rows. Returns the budget left."""
        rows = self.backend.prefill_rows
        for run in consecutive_runs(active):
            most = min(budget, FA_TILE_ROWS - 1)
            most -= most % rows if rows else 0
            if most < max(2, rows):
                break
            per = min(whole(min(len(slot.pending) for slot in run), rows), most)  # >= 2: one
            run = run[:budget // per]  # pending token is a decoder's
            if len(run) == 1:
                per = min(whole(len(run[0].pending), rows), most)
            budget -= per * len(run)
            (self._prefill if rows else self._step)([(slot, per) for slot in run])
        return budget

    def _prefill(self, plan: list[tuple[Slot, int]]) -> None:
        """One decode in the prefill context: `per` rows from each slot, a prompt's last chunk
        padded past its end; finished prompts are copied to the main context and sample."""
        entries: list[tuple[int, int, int, bool]] = []
        outputs: list[tuple[Slot, int]] = []
        for slot, per in plan:
            if not slot.prefilled:  # its first chunk: the prefill context takes its cache
                if slot.mirrored < len(slot.cached):
                    self.backend.to_prefill(slot.seq)
                else:
                    self.backend.forget_prefill(slot.seq, len(slot.cached))
                slot.mirrored = len(slot.cached)
            start = len(slot.cached) + len(slot.prefilled)
            chunk, slot.pending = slot.pending[:per], slot.pending[per:]
            for i, token in enumerate(chunk):
                wants = not slot.pending and i == len(chunk) - 1
                if wants:
                    outputs.append((slot, len(entries)))
                entries.append((token, start + i, slot.seq, wants))
            # padding, dropped again: the chunk's rows are whole groups
            entries += [(chunk[-1], start + i, slot.seq, False) for i in range(len(chunk), per)]
            slot.prefilled.extend(chunk)
        self._decode(entries, prefill=True)
        for slot, _ in outputs:
            slot.cached.extend(slot.prefilled)
            slot.prefilled = []
            self.backend.from_prefill(slot.seq, len(slot.cached))
            slot.mirrored = slot.prompted = len(slot.cached)
        self._sample_outputs(outputs)

    def _decode_step(self, active: list[Slot]) -> None:
        seqs = [slot.seq for slot in active]
        low, high = min(seqs), max(seqs)
        if low == high and len(active[0].cached) >= LONE_ROW_CELLS:  # give it a neighbour
            if high + 1 < self.n_seq:
                high += 1
            else:
                low -= 1
        entries: list[tuple[int, int, int, bool]] = []
        dummies: list[tuple[int, int]] = []
        outputs: list[tuple[Slot, int]] = []
        for seq in range(low, high + 1):
            slot = self.slots[seq] if seq < len(self.slots) else None
            if slot is not None and slot in active:
                outputs.append((slot, len(entries)))
                entries.append((slot.pending[0], len(slot.cached), seq, True))
            else:
                pos = len(slot.cached) if slot is not None else 0
                entries.append((0, pos, seq, False))
                dummies.append((seq, pos))
        self._decode(entries)
        for seq, pos in dummies:
            self.backend.forget(seq, pos)
        for slot, _ in outputs:
            slot.cached.append(slot.pending[0])
            slot.pending = []
        self._sample_outputs(outputs)

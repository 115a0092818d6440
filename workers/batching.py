"""Continuous batching: one resident llama.cpp context decodes every active job in one step.

The worker's task threads (one per Celery slot, `max_batch` of them) each submit a request and
read its token pieces from a queue; one engine thread owns the model and loops:

1. free the slots of requests that were cancelled or closed, and seat waiting requests (most
   urgent first) in free slots, reusing the longest cached prefix any slot holds (a slot's own
   leftovers, or another slot's by sharing its KV cells: system prompts, summary instructions);
2. plan one batch: one token for every decoding sequence first, then prompt chunks of joining
   sequences up to `prompt_chunk_tokens`, so a long prompt never stalls the others for long;
3. one `llama_decode` for the whole batch, then each finished prompt or decoding sequence
   samples its next token with its own sampler chain (sampling parameters, seed, penalties).

Sampled pieces wait in an outbox until every sequence of the step has sampled, and go to their
task threads just before the next decode: a task thread woken in the middle of sampling takes
the GIL between the engine's llama.cpp calls (measured: sampling 8 sequences took 6 ms instead
of 2.5 ms), whereas during a decode the engine holds no GIL.

Planning and slot choice are plain functions over token lists, tested with a fake backend.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from workers.engine import Sampling

log = logging.getLogger("tokenpool.batching")

END = None  # what a request's queue yields after its last piece
SHARED_PREFIX_MIN = 32  # tokens of a coming shared prefix worth waiting for


class Backend(Protocol):
    """The few llama.cpp operations the engine needs (a fake implements them in tests)."""

    can_share: bool  # whether one sequence can take another's cells (a unified KV cache)

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """Decode (token, pos, seq, wants logits) entries in one batch."""
        ...

    def sample(self, request: Request, batch_index: int) -> int: ...

    def is_eog(self, token: int) -> bool: ...

    def piece(self, token: int) -> bytes: ...

    def forget(self, seq: int, from_pos: int) -> None:
        """Drop a sequence's cached cells from `from_pos` on."""
        ...

    def share(self, src: int, dst: int, n_tokens: int) -> None:
        """Make `dst` hold `src`'s first `n_tokens` cells (no recompute)."""
        ...


@dataclass(eq=False)
class Request:
    tokens: list[int]  # the whole prompt (a continued job: prompt + its published tokens)
    sampling: Sampling
    max_new: int  # tokens it may still sample
    priority: int = 5
    out: queue.SimpleQueue[bytes | Exception | None] = field(default_factory=queue.SimpleQueue)
    closed: threading.Event = field(default_factory=threading.Event)
    sampler: object | None = None  # the backend's sampler chain, made when seated
    sampled: int = 0
    reused: int = 0  # prompt tokens found in the cache


@dataclass(eq=False)
class Slot:
    seq: int
    cached: list[int] = field(default_factory=list)  # tokens whose cells this seq holds
    request: Request | None = None
    pending: list[int] = field(default_factory=list)  # tokens still to decode


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def best_donor(slots: Sequence[Slot], target: Slot, tokens: Sequence[int]) -> tuple[Slot, int]:
    """The slot whose cached tokens share the longest prefix with `tokens` (the target's own
    cache wins ties: it needs no copy). At least one prompt token is always left to decode,
    since its logits give the first sampled token."""
    limit = len(tokens) - 1
    best, best_n = target, min(common_prefix(target.cached, tokens), limit)
    for slot in slots:
        n = min(common_prefix(slot.cached, tokens), limit)
        if n > best_n:
            best, best_n = slot, n
    return best, best_n


def plan_batch(slots: Sequence[Slot], n_batch: int, prompt_chunk: int) -> list[tuple[Slot, int]]:
    """(slot, how many of its pending tokens) for one decode: decoders first, then prompts."""
    plan: list[tuple[Slot, int]] = []
    budget = n_batch
    for slot in slots:
        if slot.request is not None and len(slot.pending) == 1 and budget > 0:
            plan.append((slot, 1))
            budget -= 1
    chunk_budget = min(budget, prompt_chunk)
    for slot in slots:
        if slot.request is not None and len(slot.pending) > 1 and chunk_budget > 0:
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
        self._outbox: list[tuple[queue.SimpleQueue[bytes | Exception | None],
                                 bytes | Exception | None]] = []
        self._thread = threading.Thread(target=self._loop, name="batch-engine", daemon=True)
        self._thread.start()

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
            self._release_closed()
            self._seat_waiting()
            plan = plan_batch(self.slots, self.n_batch, self.prompt_chunk)
            if not plan:
                self._idle()
                continue
            try:
                self._step(plan)
            except Exception as exc:  # a failed decode fails the jobs in it, not the engine
                self._fail([slot for slot, _ in plan], exc)
        self._deliver()

    def _idle(self) -> None:
        """Nothing to decode: hand out what the last step produced, then wait for work."""
        self._deliver()
        self._wake.wait(0.05)
        self._wake.clear()

    def _fail(self, slots: list[Slot], exc: Exception) -> None:
        log.exception("decode step failed")
        for slot in slots:
            self._finish(slot, exc)
        self._deliver()

    def _deliver(self) -> None:
        """Hand the step's sampled pieces (and ends) to their task threads, in order."""
        outbox, self._outbox = self._outbox, []
        for out, item in outbox:
            out.put(item)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        self._deliver()  # the task threads run while llama.cpp computes, GIL released
        self.backend.decode(entries)
        self.steps += 1

    def _release_closed(self) -> None:
        for slot in self.slots:
            if slot.request is not None and slot.request.closed.is_set():
                self._finish(slot, None)

    def _seat_waiting(self) -> None:
        deferred = []
        with self._lock:
            while self._waiting and any(s.request is None for s in self.slots):
                entry = heapq.heappop(self._waiting)
                request = entry[2]
                if request.closed.is_set():
                    request.out.put(END)
                elif self._prefix_coming(request):
                    deferred.append(entry)
                else:
                    self._seat(request)
            for entry in deferred:
                heapq.heappush(self._waiting, entry)

    def _prefix_coming(self, request: Request) -> bool:
        """Another slot is still decoding a prompt that shares a long prefix with this one:
        wait for its cells rather than compute the same prefix twice."""
        if not self.backend.can_share:
            return False
        for slot in self.slots:
            if slot.request is None or not slot.pending:
                continue
            cached = common_prefix(slot.cached, request.tokens)
            planned = common_prefix(slot.cached + slot.pending, request.tokens)
            if planned >= SHARED_PREFIX_MIN and planned > cached:
                return True
        return False

    def _seat(self, request: Request) -> None:
        free = [s for s in self.slots if s.request is None]
        # Prefer a free slot whose own cache matches best, then any donor's cells.
        target = max(free, key=lambda s: common_prefix(s.cached, request.tokens))
        donors = self.slots if self.backend.can_share else [target]
        donor, n = best_donor(donors, target, request.tokens)
        if donor is target:
            self.backend.forget(target.seq, n)
        else:
            self.backend.forget(target.seq, 0)
            self.backend.share(donor.seq, target.seq, n)
        target.cached = list(request.tokens[:n])
        target.pending = list(request.tokens[n:])
        target.request = request
        request.reused = n
        request.sampler = None

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
        for slot, index in outputs:
            self._sample(slot, index)

    def _sample(self, slot: Slot, index: int) -> None:
        request = slot.request
        assert request is not None
        token = self.backend.sample(request, index)
        request.sampled += 1
        if self.backend.is_eog(token):
            self._finish(slot, None)
            return
        self._outbox.append((request.out, self.backend.piece(token)))
        if request.sampled >= request.max_new or len(slot.cached) + 1 >= self.n_ctx:
            self._finish(slot, None)
            return
        slot.pending = [token]

    def _finish(self, slot: Slot, error: Exception | None) -> None:
        request = slot.request
        if request is None:
            return
        slot.pending = []  # tokens never decoded are not in the cache
        self._outbox.append((request.out, error if error is not None else END))
        slot.request = None


def pieces(engine: BatchEngine, request: Request) -> Generator[bytes, None, None]:
    """A request's sampled pieces as they come; closing the iterator cancels the request."""
    engine.submit(request)
    try:
        while True:
            item = request.out.get()
            if item is END:
                return
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        request.closed.set()
        engine._wake.set()


ROW_GROUP = 4  # llama.cpp's repacked x86 kernels multiply rows 4 at a time, the rest one by one


def padded_rows(n: int) -> int:
    """`n` rounded up to whole row groups."""
    return -(-n // ROW_GROUP) * ROW_GROUP


class InvariantBatchEngine(BatchEngine):
    """Batch-invariant decoding: a job's tokens do not depend on the other jobs in the batch.

    llama.cpp's kernels add in an order that depends on the shape of the batch, so greedy text
    can change with the company a job keeps. `python -m bench.invariance` shows one way, on a
    CPU: the repacked weights multiply rows in groups of 4 with one kernel and the rows left
    over with another, and the two round differently. So every step here has one of two
    shapes, each a whole number of groups:

    - a decode step has a row for every slot, rounded up to a whole group (idle slots, and
      spare sequences past `max_batch`, decode a dummy token that is dropped again). Shorter
      steps (up to the highest busy slot) were tried: 4-row and 8-row steps gave a job
      different text, so the shape stays fixed;
    - a prompt step gives each joining job exactly `prompt_chunk` rows (a whole number of
      groups; padded past the prompt's end, the padding dropped again), all joining jobs in
      one step.

    With per-sequence KV streams (no shared cells) and no prefix reuse, a job's rows see the
    same arithmetic whoever else runs. It costs the dummy and padding rows, so it is opt-in
    (`batch_invariant`).
    """

    def __init__(self, backend: Backend, max_batch: int, n_ctx: int, n_batch: int = 512,
                 prompt_chunk: int = 32) -> None:
        super().__init__(backend, max_batch, n_ctx, n_batch, padded_rows(prompt_chunk))
        self.decode_rows = padded_rows(max_batch)  # every slot, then spare sequences
        self.prompt_jobs = max(1, n_batch // self.prompt_chunk)  # joining jobs per prompt step

    def _loop(self) -> None:
        prompt_turn = True
        while not self._stop.is_set():
            self._release_closed()
            self._seat_waiting()
            prompting = [s for s in self.slots if s.request is not None and
                         s.request.sampled == 0 and s.pending]
            decoding = [s for s in self.slots if s.request is not None and
                        s.request.sampled > 0 and s.pending]
            if not prompting and not decoding:
                self._idle()
                continue
            prompt_turn = not prompt_turn if (prompting and decoding) else bool(prompting)
            step = self._prompt_step if prompt_turn else self._decode_step
            active = prompting[: self.prompt_jobs] if prompt_turn else decoding
            try:
                step(active)
            except Exception as exc:
                self._fail(active, exc)
        self._deliver()

    def _prefix_coming(self, request: Request) -> bool:
        return False

    def _seat(self, request: Request) -> None:
        target = next(s for s in self.slots if s.request is None)
        self.backend.forget(target.seq, 0)
        target.cached, target.pending = [], list(request.tokens)
        target.request, request.reused, request.sampler = request, 0, None

    def _prompt_step(self, active: list[Slot]) -> None:
        entries: list[tuple[int, int, int, bool]] = []
        outputs: list[tuple[Slot, int]] = []
        cut: list[tuple[Slot, list[int]]] = []
        for slot in active:
            chunk = slot.pending[: self.prompt_chunk]
            start, last = len(slot.cached), len(chunk) == len(slot.pending)
            if last:
                outputs.append((slot, len(entries) + len(chunk) - 1))
            entries += [(token, start + i, slot.seq, last and i == len(chunk) - 1)
                        for i, token in enumerate(chunk)]
            pad = self.prompt_chunk - len(chunk)
            entries += [(chunk[-1], start + len(chunk) + i, slot.seq, False) for i in range(pad)]
            cut.append((slot, chunk))
        self._decode(entries)
        for slot, chunk in cut:
            self.backend.forget(slot.seq, len(slot.cached) + len(chunk))
            slot.cached.extend(chunk)
            slot.pending = slot.pending[len(chunk):]
        self._sample_outputs(outputs)

    def _decode_step(self, active: list[Slot]) -> None:
        entries: list[tuple[int, int, int, bool]] = []
        dummies: list[tuple[int, int]] = []
        outputs: list[tuple[Slot, int]] = []
        for seq in range(self.decode_rows):
            slot = self.slots[seq] if seq < len(self.slots) else None
            if slot is not None and slot in active:
                outputs.append((slot, len(entries)))
                entries.append((slot.pending[0], len(slot.cached), seq, True))
            else:  # an idle or prompting slot, or a spare sequence: a dummy row
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

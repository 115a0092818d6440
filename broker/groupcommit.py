"""Script calls from many threads sent in shared round trips (group commit).

Every sampled token is one fenced script call (`JobStore.append`). Sent one by one, each call
costs a round trip: on the 2-core reference machine about 100 µs of client CPU, four times what
the same call costs inside a pipeline (measured: 24 µs each in a pipeline of 8), and that CPU
is taken from llama.cpp's compute threads. Calls are queued (`submit`) and whichever thread
waits for an answer (`wait`) while no round trip is under way sends every call queued so far
in one pipeline; other waiters wait for their own answers. Nothing waits for company: a call
alone goes at once (`call`). A batch engine queues the appends of all its jobs' tokens of a
step from its own thread, then sends them (`send`) before its next decode and reads their
answers after it (the next `wait` of any thread reads them): one round trip a step, and
Redis's part of it runs while llama.cpp computes. With decode steps as short as a GPU's (a
20M-parameter model on one CPU thread, about 1.3 ms a token: `python -m bench.batching --fast
--threads 1 --model tiny.gguf`, see docs/gpu.md), waiting for the reply took a sixth of the
engine thread's busy time; sending before the decode took tokenpool from 0.68, 0.88 and 0.88x
llama-server's rate at 1, 8 and 16 jobs to 0.94, 1.02 and 0.95x (two runs each, alternated).

Each call keeps its own answer and its own error, as if sent alone: the scripts are fenced
per job, so batching them changes no outcome. A pipeline retried after a lost connection
repeats calls that are no-ops the second time (each append carries the seq it expects).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError, ResponseError


@dataclass(eq=False)
class PendingCall:
    script: Script
    keys: list[Any]
    args: list[Any]
    result: Any = None
    error: BaseException | None = None
    replied: bool = False
    done: bool = False

    @property
    def command(self) -> tuple[Any, ...]:
        """The EVALSHA this call sends, in a pipeline or written by `send`."""
        return ("EVALSHA", self.script.sha, len(self.keys), *self.keys, *self.args)

    def answer(self, reply: Any) -> None:
        if isinstance(reply, Exception):
            self.error = reply
        else:
            self.result = reply
        self.replied = True


@dataclass(eq=False)
class GroupCommit:
    client: redis.Redis
    round_trips: int = 0  # pipelines (or single calls) sent so far
    calls: int = 0
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _queue: list[PendingCall] = field(default_factory=list)
    _busy: bool = False  # a thread is sending or reading a round trip
    # Sent by `send`, replies not yet read: the calls and their connection (None: the send
    # failed, and the reader sends them again the usual way, with the client's retries).
    _inflight: tuple[list[PendingCall], Any] | None = None

    def call(self, script: Script, keys: list[Any], args: list[Any]) -> Any:
        """The script's reply, or its error raised, as `script(keys=keys, args=args)`."""
        return self.wait(self.submit(script, keys, args))

    def submit(self, script: Script, keys: list[Any], args: list[Any]) -> PendingCall:
        """Queue a call without sending it: it goes with the next round trip, which the next
        `wait` (or `call`) of any thread sends."""
        call = PendingCall(script, keys, args)
        with self._cond:
            self._queue.append(call)
        return call

    def send(self) -> None:
        """Send what is queued now without reading the replies: the next `wait` (of any
        thread) reads them. Nothing is sent while another round trip is under way or unread
        (its reader sends the queue next)."""
        with self._cond:
            if self._busy or self._inflight is not None or not self._queue:
                return
            batch, self._queue, self._busy = self._queue, [], True
        connection = None
        try:
            connection = self._post(batch)
        finally:
            with self._cond:
                self._inflight = (batch, connection)
                self._busy = False
                self._cond.notify_all()

    def wait(self, call: PendingCall) -> Any:
        """A submitted call's reply, or its error raised; reads the replies of a round trip
        sent before, then sends what is queued, if no other thread is doing so."""
        with self._cond:
            while not call.done:
                if self._busy:
                    self._cond.wait()
                    continue
                if self._inflight is not None:
                    (batch, connection), self._inflight = self._inflight, None
                else:
                    batch, self._queue, connection = self._queue, [], None
                self._busy = True
                self._cond.release()
                try:
                    if connection is not None:
                        self._receive(batch, connection)
                    else:
                        self._send(batch)
                finally:
                    self._cond.acquire()
                    self._busy = False
                    self._cond.notify_all()
        if call.error is not None:
            raise call.error
        return call.result

    def _post(self, batch: list[PendingCall]) -> Any:
        """Write the calls on a connection of the pool; it, or None where the write failed."""
        pool = self.client.connection_pool
        try:
            connection = pool.get_connection()
        except Exception:  # Redis away: the reader's send retries
            return None
        try:
            connection.send_packed_command(connection.pack_commands([c.command for c in batch]))
        except Exception:
            connection.disconnect()
            pool.release(connection)
            return None
        return connection

    def _receive(self, batch: list[PendingCall], connection: Any) -> None:
        """Read the replies of calls `_post` sent; calls whose replies are lost with the
        connection are sent again the usual way (each script is a no-op the second time)."""
        replies: list[Any] = []
        try:
            for _ in batch:
                try:
                    replies.append(connection.read_response())
                except ResponseError as exc:
                    replies.append(exc)
        except Exception:
            connection.disconnect()
        finally:
            self.client.connection_pool.release(connection)
        self.round_trips += 1
        self.calls += len(replies)
        try:
            self._answer(batch[:len(replies)], replies)
        finally:
            for call in batch[:len(replies)]:
                call.done = True
        if len(replies) < len(batch):
            self._send(batch[len(replies):])

    def _send(self, batch: list[PendingCall]) -> None:
        self.round_trips += 1
        self.calls += len(batch)
        try:
            if len(batch) == 1:
                batch[0].answer(batch[0].script(keys=batch[0].keys, args=batch[0].args))
            else:
                self._pipeline(batch)
        except Exception as exc:  # the round trip itself failed: every call in it did
            for call in batch:
                if not call.replied:
                    call.answer(exc)
        finally:
            for call in batch:
                call.done = True

    def _pipeline(self, batch: list[PendingCall]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for call in batch:
            pipe.execute_command(*call.command)
        self._answer(batch, pipe.execute(raise_on_error=False))

    def _answer(self, batch: list[PendingCall], replies: list[Any]) -> None:
        for call, reply in zip(batch, replies, strict=True):
            if isinstance(reply, NoScriptError):  # Redis restarted: the call did not run
                try:
                    reply = call.script(keys=call.keys, args=call.args)  # loads, then runs
                except Exception as exc:
                    reply = exc
            call.answer(reply)

"""A worker's model state, with the legal transitions only, and the recent ones for telemetry.

    idle ──> loading ──> loaded <──> generating
      ^         │          │            │
      │         v          v            v
      └───── unloading <───┘          error ──> loading (retry, or another model)
      └──────── error <── loading / unloading
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Literal

State = Literal["idle", "loading", "loaded", "generating", "unloading", "error"]

TRANSITIONS: dict[str, frozenset[str]] = {
    "idle": frozenset({"loading"}),
    "loading": frozenset({"loaded", "error"}),
    "loaded": frozenset({"generating", "unloading"}),
    "generating": frozenset({"loaded", "error"}),
    "unloading": frozenset({"idle", "error"}),
    "error": frozenset({"loading", "idle"}),
}
HISTORY = 32  # transitions kept for the heartbeat


class IllegalTransition(RuntimeError):
    pass


class StateMachine:
    def __init__(self, state: State = "idle") -> None:
        self._state: str = state
        self._lock = threading.Lock()
        self.since = time.time()
        self.history: deque[tuple[float, str, str]] = deque(maxlen=HISTORY)

    @property
    def state(self) -> str:
        return self._state

    def to(self, new: State) -> None:
        with self._lock:
            self._move(new)

    def to_if(self, old: State, new: State) -> bool:
        """Move from `old` to `new` if the state is `old` now; False (and no move) otherwise."""
        with self._lock:
            if self._state != old:
                return False
            self._move(new)
            return True

    def _move(self, new: str) -> None:
        if new not in TRANSITIONS[self._state]:
            raise IllegalTransition(f"{self._state} -> {new}")
        now = time.time()
        self.history.append((now, self._state, new))
        self._state, self.since = new, now

    def recent(self) -> list[list[float | str]]:
        """The last transitions, oldest first: [ts, from, to]."""
        return [[round(ts, 3), old, new] for ts, old, new in self.history]

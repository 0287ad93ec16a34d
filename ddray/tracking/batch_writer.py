"""Write records in batches on a background thread, off the caller's critical path, losing none.

A run logs a handful of metrics per meta-step; writing each step's to the tracking
store at once (a database transaction for SQLite, an HTTP request for a server)
puts that latency inside the step. :class:`BatchWriter` queues them and writes what
has gathered every ``every_s`` seconds (or sooner once ``max_batch`` are waiting)
in one call per ``max_batch`` records, on a daemon thread.

Nothing is lost at the end: :meth:`BatchWriter.close` (and :meth:`flush`) write
everything pending in the calling thread, and an ``atexit`` hook closes every
writer still open when the interpreter exits. A process killed outright (SIGKILL,
out of memory) loses at most the records of the last ``every_s`` seconds.

A failed write keeps its records (the next flush retries them) and is raised in the
caller's thread by the next :meth:`add`, :meth:`flush` or :meth:`close`.
"""

from __future__ import annotations

import atexit
import threading
import weakref
from typing import Callable, Generic, Iterable, TypeVar

T = TypeVar("T")

_OPEN: "weakref.WeakSet[BatchWriter[object]]" = weakref.WeakSet()


class BatchWriter(Generic[T]):
    """Records added by the caller, written by ``write(batch)`` from a background thread.

    Args:
        write: writes one batch (at most ``max_batch`` records, in the order added).
        every_s: seconds between background writes (> 0).
        max_batch: records per ``write`` call; this many waiting wake the thread early.
    """

    def __init__(self, write: Callable[[list[T]], None], every_s: float = 2.0, max_batch: int = 1000) -> None:
        if not every_s > 0:
            raise ValueError(f"BatchWriter: every_s must be > 0, got {every_s!r}")
        if max_batch < 1:
            raise ValueError(f"BatchWriter: max_batch must be >= 1, got {max_batch!r}")
        self._write, self.every_s, self.max_batch = write, every_s, max_batch
        self._pending: list[T] = []
        self._lock = threading.Lock()  # guards _pending and _error
        self._writing = threading.Lock()  # one writer at a time, so batches land in order
        self._wake = threading.Event()
        self._error: BaseException | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        _OPEN.add(self)  # type: ignore[arg-type]

    @property
    def pending(self) -> int:
        """Records added but not yet written."""
        with self._lock:
            return len(self._pending)

    def add(self, records: Iterable[T]) -> None:
        """Queue ``records``; raises a previous background write's error (its records are kept)."""
        self._raise_error()
        if self._closed:
            raise RuntimeError("BatchWriter: add() after close()")
        with self._lock:
            self._pending.extend(records)
            full = len(self._pending) >= self.max_batch
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="ddray-batch-writer", daemon=True)
            self._thread.start()
        if full:
            self._wake.set()

    def flush(self) -> None:
        """Write everything pending now, in this thread; raise if a write fails."""
        self._raise_error()
        self._drain()
        self._raise_error()

    def close(self) -> None:
        """Flush and stop the background thread (later calls do nothing)."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        _OPEN.discard(self)  # type: ignore[arg-type]
        self.flush()

    # -- internals -----------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._closed:
            self._wake.wait(self.every_s)
            self._wake.clear()
            if self._error is None:  # after a failure, wait for the caller to see it
                self._drain()

    def _drain(self) -> None:
        with self._writing:
            with self._lock:
                batch, self._pending = self._pending, []
            for i in range(0, len(batch), self.max_batch):
                try:
                    self._write(batch[i:i + self.max_batch])
                except BaseException as e:
                    with self._lock:  # keep what was not written, in order, ahead of newer records
                        self._pending[:0] = batch[i:]
                        self._error = e
                    return

    def _raise_error(self) -> None:
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error


@atexit.register
def _close_all() -> None:
    """Write what every open writer still holds when the interpreter exits."""
    for writer in list(_OPEN):
        try:
            writer.close()
        except Exception:  # the process is ending; nothing to report the error to
            pass

"""BatchWriter: records written in order, in batches, off the caller's thread; none lost at close or on errors."""

from __future__ import annotations

import threading
import time

import pytest

from ddray.tracking.batch_writer import BatchWriter


class Sink:
    """Collects the batches it is given (and on which thread), failing while ``fail`` is set."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.fail = False

    def __call__(self, batch: list[int]) -> None:
        if self.fail:
            raise OSError("store down")
        self.batches.append(list(batch))
        self.threads.add(threading.current_thread().name)

    @property
    def written(self) -> list[int]:
        return [x for b in self.batches for x in b]


def test_background_thread_writes_in_batches_in_order() -> None:
    sink = Sink()
    w = BatchWriter(sink, every_s=0.05, max_batch=1000)
    for i in range(20):
        w.add([i])
    deadline = time.monotonic() + 10
    while w.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sink.written == list(range(20))
    assert len(sink.batches) < 20  # several steps per write
    assert sink.threads == {"ddray-batch-writer"}
    w.close()


def test_nothing_is_written_before_the_interval_and_close_writes_everything() -> None:
    sink = Sink()
    w = BatchWriter(sink, every_s=3600, max_batch=4)
    w.add(range(10))  # ≥ max_batch: wakes the thread, which writes chunks of 4
    deadline = time.monotonic() + 10
    while w.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sink.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    w.add([10, 11])
    time.sleep(0.2)
    assert w.pending == 2 and sink.written == list(range(10))  # waits for the interval
    w.close()
    assert sink.written == list(range(12)) and w.pending == 0
    w.close()  # idempotent
    with pytest.raises(RuntimeError, match="after close"):
        w.add([1])


def test_a_failed_write_keeps_its_records_and_is_raised_to_the_caller() -> None:
    sink = Sink()
    w = BatchWriter(sink, every_s=3600)
    w.add([1, 2])
    sink.fail = True
    with pytest.raises(OSError, match="store down"):
        w.flush()
    assert w.pending == 2
    w.add([3])
    sink.fail = False
    w.close()
    assert sink.written == [1, 2, 3]


def test_a_background_failure_surfaces_on_the_next_add() -> None:
    sink = Sink()
    sink.fail = True
    w = BatchWriter(sink, every_s=0.02)
    w.add([1])
    deadline = time.monotonic() + 10
    while w._error is None and time.monotonic() < deadline:  # noqa: SLF001 - wait for the thread's try
        time.sleep(0.01)
    with pytest.raises(OSError, match="store down"):
        w.add([2])
    sink.fail = False
    w.add([2])
    w.close()
    assert sink.written == [1, 2]


@pytest.mark.parametrize("kw", [{"every_s": 0}, {"every_s": -1.0}, {"max_batch": 0}])
def test_bad_settings_are_refused(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="BatchWriter: (every_s|max_batch) must be"):
        BatchWriter(Sink(), **kw)  # type: ignore[arg-type]

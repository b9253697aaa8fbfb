import asyncio
import threading
import time

import pytest

from genret.serve.batcher import DynamicBatcher, QueueFull


def test_concurrent_jobs_share_calls_and_each_gets_its_own_result():
    calls = []

    def handler(xs):
        calls.append(list(xs))
        time.sleep(0.02)
        return [x * 10 for x in xs]

    b = DynamicBatcher({"x": handler}, max_batch=8, max_wait=0.05)
    try:
        futures = [b.submit("x", i) for i in range(20)]
        assert [f.result(timeout=10) for f in futures] == [i * 10 for i in range(20)]
    finally:
        b.close()
    assert sum(len(c) for c in calls) == 20 and max(len(c) for c in calls) == 8 and len(calls) < 20


def test_kinds_never_mix_and_a_bad_job_fails_alone():
    seen = []

    def strict(xs):
        seen.append(("s", list(xs)))
        if any(x < 0 for x in xs):
            raise ValueError("negative")
        return xs

    b = DynamicBatcher({"s": strict, "t": lambda xs: [("t", x) for x in xs]}, max_batch=16, max_wait=0.05)
    try:
        fs = [b.submit("s", 1), b.submit("t", 2), b.submit("s", -1), b.submit("s", 3)]
        assert fs[0].result(5) == 1 and fs[1].result(5) == ("t", 2) and fs[3].result(5) == 3
        with pytest.raises(ValueError, match="negative"):
            fs[2].result(5)
    finally:
        b.close()
    assert all(isinstance(x, int) for _, xs in seen for x in xs)


def test_bounded_queue_and_async_timeout():
    gate = threading.Event()
    b = DynamicBatcher({"x": lambda xs: (gate.wait(5), xs)[1]}, max_batch=1, max_wait=0, max_queue=2)
    try:
        first = b.submit("x", 0)
        time.sleep(0.1)  # the worker holds the first job
        b.submit("x", 1)
        with pytest.raises(asyncio.TimeoutError):  # a request past its timeout: its job is cancelled, never run
            asyncio.run(b.run("x", 2, timeout=0.05))
        with pytest.raises(QueueFull, match="retry later"):  # 1 and the timed-out 2 still hold the queue's places
            b.submit("x", 3)
        gate.set()
        assert first.result(5) == 0
    finally:
        gate.set()
        b.close()

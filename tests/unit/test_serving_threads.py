"""Request threads get the pinned thread count, not just the thread that loaded the bundle."""

from __future__ import annotations

import threading

import faiss
import pytest

from qarm_features.feast import context


@pytest.fixture
def pinned(monkeypatch):
    monkeypatch.setitem(context._threads, "n", 1)
    monkeypatch.setitem(context._threads, "pinned", None)
    before = faiss.omp_get_max_threads()
    yield
    faiss.omp_set_num_threads(before)


def test_each_request_thread_is_pinned(pinned):
    context.pin_request_thread()  # the loading thread
    assert faiss.omp_get_max_threads() == 1
    seen = []

    def request_thread():
        faiss.omp_set_num_threads(2)  # a fresh worker thread with the default pool
        context.pin_request_thread()
        seen.append(faiss.omp_get_max_threads())

    t = threading.Thread(target=request_thread)
    t.start()
    t.join()
    assert seen == [1]

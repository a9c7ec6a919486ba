"""Request threads get the pinned thread count, not just the thread that loaded the bundle."""

from __future__ import annotations

import threading

import faiss
import pytest

from transformations import on_demand


@pytest.fixture
def pinned(monkeypatch):
    monkeypatch.setitem(on_demand._state, "threads", 1)
    monkeypatch.setitem(on_demand._state, "pinned", None)
    before = faiss.omp_get_max_threads()
    yield
    faiss.omp_set_num_threads(before)


def test_each_request_thread_is_pinned(pinned):
    on_demand.pin_threads()  # the loading thread
    assert faiss.omp_get_max_threads() == 1
    seen = []

    def request_thread():
        faiss.omp_set_num_threads(2)  # a fresh worker thread with the default pool
        on_demand.pin_threads()
        seen.append(faiss.omp_get_max_threads())

    t = threading.Thread(target=request_thread)
    t.start()
    t.join()
    assert seen == [1]

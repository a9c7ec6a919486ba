"""A bounded, closed-loop HTTP load generator for ``feast serve`` (its own process).

``concurrency`` threads each hold one keep-alive connection and send the same POST body
back to back for ``duration`` seconds (closed loop: at most ``concurrency`` requests in
flight, so the load is bounded and the server is never flooded). Prints one JSON line:
requests, errors, requests/s, p50/p99 latency in ms.

Usage: ``python -m benchmarks.loadgen PORT BODY_FILE CONCURRENCY DURATION_S``.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import threading
import time


def run(port: int, body: bytes, concurrency: int, duration: float, path: str = "/get-online-features") -> dict:
    lat: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    start = threading.Barrier(concurrency + 1)
    stop_at = [0.0]

    def connect() -> http.client.HTTPConnection:
        # TCP_NODELAY: http.client sends a large body in a second segment; with Nagle on,
        # that segment waits for the delayed ACK of the first (~20-40 ms per request).
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def worker(i: int) -> None:
        conn = connect()
        headers = {"Content-Type": "application/json"}
        start.wait()
        mine = lat[i]
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at[0]:
                break
            try:
                conn.request("POST", path, body, headers)
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    errors[i] += 1
                    continue
            except (OSError, http.client.HTTPException):
                errors[i] += 1
                conn.close()
                conn = connect()
                continue
            mine.append(time.perf_counter() - t0)
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    t_begin = time.perf_counter()
    stop_at[0] = t_begin + duration
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t_begin
    all_lat = sorted(x for part in lat for x in part)
    n = len(all_lat)

    def pct(q: float) -> float | None:
        return all_lat[min(n - 1, int(q / 100 * n))] * 1e3 if n else None

    return {
        "concurrency": concurrency,
        "requests": n,
        "errors": sum(errors),
        "seconds": elapsed,
        "rps": n / elapsed if elapsed > 0 else 0.0,
        "p50_ms": pct(50),
        "p99_ms": pct(99),
    }


def main() -> None:
    port, body_file, concurrency, duration = sys.argv[1:5]
    with open(body_file, "rb") as f:
        body = f.read()
    print(json.dumps(run(int(port), body, int(concurrency), float(duration))))


if __name__ == "__main__":
    main()

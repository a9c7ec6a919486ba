"""The CLI's rendering of library stages: one bar per stage, finished when the next starts;
without a terminal, one plain line per stage step, written as it goes."""

from __future__ import annotations

import io

from rich.console import Console

from qarm_features.app.render import stage_progress
from qarm_features.progress import stage


def test_stages_render_as_bars_with_counts():
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=True)
    with stage_progress(console) as (on_progress, on_step):
        on_step("reading the catalog")
        with stage("encode", total=300, progress=on_progress) as s:
            for _ in range(3):
                s.advance(100)
        with stage("aligner", total=40, progress=on_progress) as s:
            s.advance(7)  # early stopping: the bar ends at 7/7, not 7/40
    text = out.getvalue()
    assert "reading the catalog" in text
    assert "encode" in text and "300/300" in text
    assert "aligner" in text and "7/7" in text


def test_without_a_terminal_each_step_is_a_line_written_as_it_goes():
    """A log file or a pipe: the line of each step is in the file before the next step
    (rich would draw its bars only at the end); count, rate and ETA on each."""
    from qarm_features.app.render import PlainProgress

    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=False)
    now = [0.0]
    plain = PlainProgress(console, clock=lambda: now[0])
    plain.on_step("encoding item content")
    plain.on_progress("encode", 10_000, 0)
    seen = []
    for _ in range(4):
        now[0] += 2.0
        plain.on_progress("encode", 10_000, 1_000)
        seen.append(out.getvalue().splitlines()[-1])
    assert seen[0] == "encode: 1,000/10,000 (10%)  500.0/s  elapsed 0:02  ETA 0:18"
    assert seen[3] == "encode: 4,000/10,000 (40%)  500.0/s  elapsed 0:08  ETA 0:12"
    plain.on_progress("aligner", 40, 0)  # the next stage: encode ends (its line is out)
    now[0] += 1.0
    plain.on_progress("aligner", 40, 7)
    now[0] += 0.1  # faster than one line a second: held back ...
    plain.on_progress("aligner", 40, 1)
    lines = out.getvalue().splitlines()
    assert lines[-1] == "aligner: 7/40 (18%)  7.0/s  elapsed 0:01  ETA 0:05"
    plain.close()  # ... and written when the stage ends
    assert out.getvalue().splitlines()[-1] == "aligner: 8/40 (20%)  7.3/s  elapsed 0:01  done"
    head = out.getvalue().splitlines()[:2]
    assert head == ["encoding item content", "encode: started, 10,000 to do"]


def test_stage_progress_writes_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    with stage_progress(Console(file=out, width=120, force_terminal=False)) as (on_progress, _):
        with stage("encode", total=300, progress=on_progress) as s:
            s.advance(100)
            assert "encode: 100/300 (33%)" in out.getvalue()  # before the display closes
            s.advance(200)
    assert "encode: 300/300 (100%)" in out.getvalue() and "━" not in out.getvalue()


def _capture(monkeypatch):
    from qarm_features.app import render

    out = io.StringIO()
    monkeypatch.setattr(render, "console", Console(file=out, width=200, force_terminal=False))
    return out


def test_materialize_summary_says_whose_views_and_how_many_rows(monkeypatch):
    from qarm_features.app.render import print_materialize

    out = _capture(monkeypatch)
    stats = {
        "version": "qarm-b", "repo": "/r/shop", "n_items": 240, "n_pushed_items_kept": 3,
        "n_history_rows": 3200, "previous_version": "qarm-a", "promoted": True,
        "materialized_views": ["product_price", "qarm", "item_content"], "kept_previous": None,
        "dropped_views": [], "cleared_views": ["qarm"], "empty_views": [],
        "encode_seconds": 1.25, "apply_seconds": 2.0, "materialize_seconds": 3.5,
        "stages": {"encode": {"seconds": 1.25}}, "streamed_views": ["qarm"],
    }  # fmt: skip
    print_materialize(stats)
    lines = out.getvalue().splitlines()
    assert lines[0] == "materialized qarm-b into /r/shop (promoted from qarm-a)"
    assert "QARM's views: qarm, item_content: 240 items (3 pushed since the build, kept), " \
           "3,200 user-history rows" in lines[1]  # fmt: skip
    assert "the team's views, materialized too" in lines[2] and lines[2].endswith("product_price")
    assert "cleared first: qarm" in out.getvalue() and "--json" in lines[-1]
    assert len(lines) <= 6 and "stages" not in out.getvalue()


def test_push_summary_quotes_a_few_ids_not_all(monkeypatch):
    from qarm_features.app.render import print_push

    out = _capture(monkeypatch)
    ids = [f"SKU-{i}" for i in range(487)]
    print_push({"version": "qarm-b", "n_items": 487, "item_ids": ids, "offline": True,
                "seconds": 1.5, "n_added_since_build": 490, "rebuild_due": True,
                "rebuild_reasons": ["490 items added since the build"]})  # fmt: skip
    text = out.getvalue()
    assert "pushed 487 items' codes online and offline with qarm-b in 1.5 s: SKU-0, SKU-1, " \
           "SKU-2, SKU-3, SKU-4, ... (482 more)" in text  # fmt: skip
    assert "SKU-5," not in text and "rebuild due: 490 items added" in text
    assert len(text.splitlines()) == 4

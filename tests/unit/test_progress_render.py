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

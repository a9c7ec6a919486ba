"""The CLI's rendering of library stages: one bar per stage, finished when the next starts."""

from __future__ import annotations

import io

from rich.console import Console

from qarm_features.app.render import stage_progress
from qarm_features.progress import stage


def test_stages_render_as_bars_with_counts():
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=False)
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

"""The README's evaluation summary is the report's: rendered from reports/movielens-100k.json
(the output of the command the README names), never typed by hand."""

from __future__ import annotations

import json
from pathlib import Path

from qarm_features.app.report import README_BEGIN, README_END, readme_summary

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_summary_is_rendered_from_the_committed_report():
    name = "movielens-100k"
    out = json.loads((ROOT / "reports" / f"{name}.json").read_text())
    readme = (ROOT / "README.md").read_text()
    begin = README_BEGIN.format(name=name)
    assert begin in readme and README_END in readme, "README lacks the summary markers"
    block = readme.split(begin, 1)[1].split(README_END, 1)[0]
    assert block.strip("\n") == readme_summary(out).strip("\n"), (
        "README's evaluation summary differs from the report: paste "
        f"readme_summary(json.load(open('reports/{name}.json'))) between the markers"
    )

"""Where a feature repo keeps QARM's files: the one place that names them.

Every path is relative to the repo directory. The offline sources of one bundle version
live together in ``data/versions/<run>/`` and ``data/current`` is a symlink to the served
set: a run writes its files beside the served ones and switches all of them (with the
repo pointer) in one atomic rename, so a crash before the switch leaves the previous set
served, whole. The bundles themselves live where ``qarm.yaml``'s ``bundles`` says
(``artifacts/bundles/<version>/`` by default, :class:`~qarm_features.project.Project`).
"""

from __future__ import annotations

from pathlib import Path

DATA = Path("data")
CURRENT = DATA / "current"  # a symlink to the served versions/<run>/
VERSIONS = DATA / "versions"
CODES_FILE = CURRENT / "qarm_codes.parquet"  # the `qarm` view's source
CONTENT_FILE = CURRENT / "item_content.parquet"  # the frozen content (baseline view)
HISTORY_FILE = CURRENT / "user_history.parquet"  # the users' behaviour sequences
# During a switch (`qarm materialize --promote --keep-previous`): the previous version's
# rows and context, served by the `qarm_prev` view beside `qarm` until the next run.
PREV_CODES_FILE = CURRENT / "qarm_prev_codes.parquet"
POINTER = CURRENT / "qarm_bundle.json"  # the bundle the repo serves (switched with the set)
PREVIOUS = CURRENT / "qarm_prev.json"  # the version kept beside the new one
# Items pushed since they were last part of a built catalog: the join key, raw_emb,
# pushed_at. `qarm materialize` keeps them (they are in no bundle's catalog yet) and
# forgets each one once a bundle's catalog holds it.
PUSHED_FILE = DATA / "qarm_pushed.parquet"
LOCK_FILE = DATA / ".qarm.lock"  # held by a promotion (feast/rollout.py)
JOURNAL_FILE = DATA / "qarm_journal.json"  # the steps of the last promotion

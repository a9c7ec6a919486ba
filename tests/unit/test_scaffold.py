"""`qarm init`'s offline store: DuckDB in a new repo; advice for a team's existing repo."""

from __future__ import annotations

import pytest
import yaml

from qarm_features.errors import ConfigError
from qarm_features.feast.scaffold import OFFLINE_STORE, init_repo, offline_store_advice


def test_a_new_repo_uses_the_duckdb_store(tmp_path):
    init_repo(tmp_path / "shop", id_type="string")
    config = yaml.safe_load((tmp_path / "shop" / "feature_store.yaml").read_text())
    assert config["offline_store"] == {"type": OFFLINE_STORE}
    assert offline_store_advice(tmp_path / "shop") is None


@pytest.mark.parametrize(
    ("block", "says"),
    [
        ("offline_store: {type: file}\n", "drops training rows"),
        ("offline_store:\n    type: dask\n", "drops training rows"),
        ("", "drops training rows"),  # Feast's default is the file store
        ("offline_store: {type: duckdb}\n", "working directory"),
    ],
)
def test_a_team_repo_that_would_lose_rows_is_told_what_to_set(tmp_path, block, says):
    (tmp_path / "feature_store.yaml").write_text(f"project: shop\nprovider: local\n{block}")
    advice = offline_store_advice(tmp_path)
    assert advice is not None and says in advice
    assert f"type: {OFFLINE_STORE}" in advice and str(tmp_path / "feature_store.yaml") in advice


def test_a_warehouse_store_is_the_teams_choice(tmp_path):
    (tmp_path / "feature_store.yaml").write_text(
        "project: shop\noffline_store:\n    type: bigquery\n    dataset: feast\n"
    )
    assert offline_store_advice(tmp_path) is None


def test_an_unreadable_config_names_the_file(tmp_path):
    (tmp_path / "feature_store.yaml").write_text("project: [unclosed\n")
    with pytest.raises(ConfigError, match="feature_store.yaml: cannot read it"):
        offline_store_advice(tmp_path)

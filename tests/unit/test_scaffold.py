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


@pytest.mark.parametrize("join_key", ["item_id", "sku", "a_much_longer_join_key_name"])
def test_qarm_yaml_comments_stay_aligned_whatever_the_join_key(join_key):
    from qarm_features.feast.scaffold import _qarm_yaml

    text = _qarm_yaml(entity="product", join_key=join_key)
    assert yaml.safe_load(text)["catalog"]["id"] == join_key
    columns = {
        line.index(" # ") + 1
        for line in text.splitlines()
        if " # " in line and not line.lstrip().startswith("#")
        and len(line.split(" # ")[0].rstrip()) < 32
    }
    assert columns == {34}, text


def test_the_entity_import_line_for_any_file_feast_loads():
    from qarm_features.feast.scaffold import import_line

    assert import_line("shop_features", "product") == "from shop_features import product"
    assert import_line("entities.product", "p") == "from entities.product import p"
    for module in ("my-defs", "teams.my-defs", "class"):
        line = import_line(module, "product")
        assert f"product = importlib.import_module({module!r}).product" in line
        namespace: dict = {}
        compile(line, "<qarm_definitions>", "exec")  # valid Python
        assert "import importlib" in line and namespace == {}

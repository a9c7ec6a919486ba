"""The same read path with a SQL registry (SQLAlchemy) on a real PostgreSQL server.

The fixture creates a throw-away cluster (as ``nobody`` when the tests run as root) on a
free loopback port; `feast -f feature_store.sqlregistry.yaml apply|materialize` run as
subprocesses against it.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from tests.integration.helpers import check_read_path, check_rollout, run_feast, subprocess_env

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:.*experimental.*:RuntimeWarning"),
]
YAML = "feature_store.sqlregistry.yaml"


@pytest.fixture(scope="module")
def sql_repo(make_repo, postgres_server, bundle_path, interactions):
    from qarm_features.feast.job import prepare_sources

    repo = make_repo("sqlreg")
    mp = pytest.MonkeyPatch()
    mp.setenv("QARM_REGISTRY_URL", postgres_server)
    prepare_sources(bundle_path, repo, interactions_df=interactions)
    env = subprocess_env(repo.parent, QARM_REGISTRY_URL=postgres_server)
    run_feast(["-f", YAML, "apply"], repo, env=env)
    end = (datetime.now(timezone.utc) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")
    run_feast(["-f", YAML, "materialize", "1970-01-01T00:00:00", end], repo, env=env)
    yield repo
    mp.undo()


def test_registry_lives_in_postgres(sql_repo, postgres_server):
    import psycopg

    dsn = postgres_server.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        names = {r[0] for r in conn.execute("SELECT feature_view_name FROM feature_views")}
        sql = "SELECT feature_view_name FROM on_demand_feature_views"
        odfvs = {r[0] for r in conn.execute(sql)}
    assert {"qarm", "item_content", "user_history"} <= names
    assert "qarm_cold" in odfvs


def test_sqlregistry_read_path(sql_repo, bundle_path):
    from qarm_features.feast.serving import check_versions
    from qarm_features.feast.store import open_store

    store = open_store(sql_repo, YAML)
    assert store.config.registry.registry_type == "sql"
    check_read_path(store, bundle_path)
    assert check_versions(sql_repo, fs_yaml_file=YAML)["ok"]


def test_sqlregistry_push_and_rollout(sql_repo, bundle_path, other_bundle_path, interactions):
    check_rollout(sql_repo, YAML, bundle_path, other_bundle_path, interactions)

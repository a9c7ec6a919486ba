"""The same read path on a real Redis online store (feature_store.redis.yaml).

The fixture starts redis-server on a free loopback port; `feast -f feature_store.redis.yaml
apply|materialize` run as subprocesses. Redis keeps a row only if its event time is newer
than the stored one, which is what the rollout check exercises.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from tests.integration.helpers import (
    check_read_path,
    check_rollout,
    feast_server,
    http_json,
    qarm_names,
    refs,
    run_feast,
    subprocess_env,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:.*experimental.*:RuntimeWarning"),
]
YAML = "feature_store.redis.yaml"


@pytest.fixture(scope="module")
def redis_repo(make_repo, redis_server, bundle_path, interactions):
    from qarm_features.feast.job import prepare_sources

    repo = make_repo("redis")
    mp = pytest.MonkeyPatch()
    mp.setenv("QARM_REDIS", redis_server)
    prepare_sources(bundle_path, repo, interactions_df=interactions)
    env = subprocess_env(repo.parent, QARM_REDIS=redis_server)
    run_feast(["-f", YAML, "apply"], repo, env=env)
    end = (datetime.now(timezone.utc) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")
    run_feast(["-f", YAML, "materialize", "1970-01-01T00:00:00", end], repo, env=env)
    yield repo
    mp.undo()


def test_redis_read_path(redis_repo, bundle_path):
    from feast.infra.online_stores.redis import RedisOnlineStore

    from qarm_features.feast.store import open_store

    store = open_store(redis_repo, YAML)
    assert isinstance(store._get_provider().online_store, RedisOnlineStore)
    check_read_path(store, bundle_path)


def test_redis_feast_serve(redis_repo, redis_server):
    env = subprocess_env(redis_repo.parent, QARM_REDIS=redis_server)
    names = qarm_names(3)
    with feast_server(redis_repo, env=env, feast_args=["-f", YAML]) as url:
        out = http_json(
            url + "/get-online-features",
            {"features": refs("qarm", names), "entities": {"item_id": [10, 404_404]}},
        )
    cols = {n: out["results"][j] for j, n in enumerate(out["metadata"]["feature_names"])}
    assert cols["rq_code_l1"]["statuses"] == ["PRESENT", "NOT_FOUND"]
    assert cols["qarm_version"]["values"][0].startswith("qarm-")


def test_redis_push_and_rollout(redis_repo, bundle_path, other_bundle_path, interactions):
    check_rollout(redis_repo, YAML, bundle_path, other_bundle_path, interactions)

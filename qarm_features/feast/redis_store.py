"""Feast's Redis online store, with unknown entities read as NOT_FOUND.

Feast 0.67's ``RedisOnlineStore`` answers a key that was never written with empty values
and status ``PRESENT`` (its SQLite store says ``NOT_FOUND``): a ranker cannot tell an
unknown item from an item whose features are null. This subclass changes exactly that:
an entity with no ``_ts:<view>`` field (no row of that view was ever written) reads as
missing, so Feast reports ``NOT_FOUND``. Everything else (writes, the newer-row-wins rule,
TTLs, cluster/sentinel modes, config keys) is Feast's.

Use it in ``feature_store.yaml``::

    online_store:
        type: qarm_features.feast.redis_store.QarmRedisOnlineStore
        connection_string: ${QARM_REDIS}
"""

from __future__ import annotations

from typing import Literal

from feast.infra.online_stores.redis import RedisOnlineStore, RedisOnlineStoreConfig

TYPE = "qarm_features.feast.redis_store.QarmRedisOnlineStore"


class QarmRedisOnlineStoreConfig(RedisOnlineStoreConfig):
    """``RedisOnlineStoreConfig`` under this store's type name (same keys)."""

    type: Literal["qarm_features.feast.redis_store.QarmRedisOnlineStore"] = TYPE  # type: ignore[assignment]


class QarmRedisOnlineStore(RedisOnlineStore):
    """``RedisOnlineStore`` that reports never-written entities as missing (NOT_FOUND)."""

    def _get_features_for_entity(self, values, feature_view, requested_features):
        ts_key = f"_ts:{feature_view}"
        for name, value in zip(requested_features, values):
            if name == ts_key:
                if not value:
                    return None, None
                break
        return super()._get_features_for_entity(values, feature_view, requested_features)

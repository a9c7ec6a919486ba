"""A DIN ranker that trains on QARM features from Feast and scores from the online store.

    python examples/feast_ranker.py [--bundle DIR] [--epochs 2] [--max-train-rows 20000]

What an existing ranker adds to use QARM, end to end on MovieLens-100k (~2 min on 2 cores).
The AUC it prints is a smoke check of the serving path (the online user history is frozen
at the end of train); `qarm evaluate` is the evaluation.

1. Global temporal split (first 80% of events = train). 10% of the catalog is held out of
   the catalog altogether: the cold items a ranker meets at serving time.
2. A bundle built from the train events and the warm catalog (or ``--bundle``).
3. A throwaway copy of ``feature_repo/`` materialized with it (``qarm`` codes, the frozen
   ``item_content`` embedding, the point-in-time ``user_history``).
4. **Training data from Feast**: ``store.get_historical_features(entity_df=train events,
   features=store.get_feature_service("qarm_ranker"))`` gives every row the target's codes
   and frozen embedding and the user's history as of that event; one more retrieval gives
   the item table (codes of the history items).
5. :class:`qarm_features.app.ranker.DINRanker` on item id + RQ codes + VQ codes + frozen
   embedding (the "B+D" deployment: QARM on top of a model that has the embedding), the
   target attending over the history's codes.
6. **Serving**: ``get_online_features(features=<the service>, entity_rows=[{user_id,
   item_id}])`` for test candidates; the items the store does not know (``NOT_FOUND``) get
   their codes from the ``qarm_cold`` on-demand view with their raw embedding.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

log = logging.getLogger("feast_ranker")
SERVICE = "qarm_ranker"


def load_data(cache_dir=None, cold_fraction=0.1, seed=0):
    from qarm_features.app.protocol import choose_cold_items, temporal_split
    from qarm_features.build.bundles import encode_catalog_text
    from qarm_features.config import BuildConfig
    from qarm_features.datasets.movielens import fetch_movielens_100k, load_movielens_100k

    ml = load_movielens_100k(fetch_movielens_100k(cache_dir))
    raw = encode_catalog_text(ml.items["text"].tolist(), BuildConfig(), cache_dir=cache_dir)
    ids = ml.items["item_id"].to_numpy(np.int64)
    train, test, _ = temporal_split(ml.interactions, 0.2)
    cold = choose_cold_items(ids, cold_fraction, seed)
    train = train[~train["item_id"].isin(cold)].reset_index(drop=True)
    return ids, raw, train, test, cold


def materialize_repo(bundle_path: Path, workdir: Path, train: pd.DataFrame) -> Path:
    """Copy the declarations of feature_repo/ to ``workdir`` and materialize the bundle."""
    from qarm_features.feast.job import materialize

    repo = workdir / "feature_repo"
    repo.mkdir(parents=True)
    for f in (ROOT / "feature_repo").iterdir():
        if f.is_file() and f.suffix in (".py", ".yaml"):
            shutil.copy(f, repo / f.name)
    stats = materialize(bundle_path, repo, catalog_df=None, interactions_df=train)
    log.info(
        "materialized %s: %d items, %d history rows",
        stats["version"],
        stats["n_items"],
        stats["n_history_rows"],
    )
    return repo


def _levels(store) -> int:
    from qarm_features.schema import rq_column

    names = {f.name for f in store.get_feature_view("qarm").features}
    return sum(rq_column(i) in names for i in range(1, len(names) + 1))


def _stack(col, width, fill, dtype):
    """A column of lists (or None) -> a dense ``(n, width)`` array padded with ``fill``."""
    out = np.full((len(col), width), fill, dtype=dtype)
    for i, v in enumerate(col):
        if v is not None and len(v):
            v = np.asarray(v, dtype=dtype)[:width]
            out[i, : v.size] = v
    return out


class ItemTable:
    """Item features keyed by item id -> rows of a :class:`ItemFeatures` table."""

    def __init__(self, frame: pd.DataFrame, n_levels: int, vq_k: int, vocab, id_vocab):
        from qarm_features.ranking import ItemFeatures

        frame = frame.drop_duplicates("item_id").reset_index(drop=True)
        self.ids = frame["item_id"].to_numpy(np.int64)
        self._pos = pd.Series(np.arange(self.ids.size), index=self.ids)
        from qarm_features.schema import CodeSchema

        rq = frame[list(CodeSchema(n_levels).rq_columns)].to_numpy(np.int64)
        vq = vocab.map(_stack(frame["vq_codes"], vq_k, -1, np.int64))
        dense = _stack(frame["raw_emb"], len(frame["raw_emb"].iloc[0]), 0.0, np.float32)
        id_index = id_vocab.map(self.ids) + 1  # 0 = an id the ranker never trained on
        self.features = ItemFeatures.from_numpy(id_index, rq=rq, vq=vq, dense=dense)

    def rows(self, item_ids) -> np.ndarray:
        """Row of each id, -1 where unknown (history padding)."""
        ids = np.asarray(item_ids, dtype=np.int64)
        return self._pos.reindex(ids).fillna(-1).to_numpy(np.int64)


def train(store, train_df: pd.DataFrame, args):
    """Fit a DINRanker on rows from get_historical_features; return (model, vocabularies)."""
    import torch

    from qarm_features.app.ranker import DINRanker, RankerConfig
    from qarm_features.ranking import CodeVocab

    n_levels = _levels(store)
    service = store.get_feature_service(SERVICE)
    rows = train_df.sample(min(len(train_df), args.max_train_rows), random_state=0)
    entity_df = pd.DataFrame(
        {
            "user_id": rows["user_id"].to_numpy(np.int64),
            "item_id": rows["item_id"].to_numpy(np.int64),
            "event_timestamp": pd.to_datetime(rows["timestamp"], unit="s", utc=True),
            "label": (rows["rating"] >= 4).astype(np.float32).to_numpy(),
        }
    )
    t0 = time.perf_counter()
    df = store.get_historical_features(entity_df=entity_df, features=service).to_df()
    log.info("get_historical_features: %d rows in %.1f s", len(df), time.perf_counter() - t0)
    if len(df) != len(entity_df):
        # The repo's DuckDB offline store returns every entity row (nulls where a user has
        # no history yet); Feast's file store would drop a user's first events
        # (docs/feast.md, "The offline store").
        log.warning("Feast returned %d of %d entity rows", len(df), len(entity_df))
    # The item table: every catalog item's codes and embedding, for history items too.
    from qarm_features.feast.sources import CODES_FILE

    catalog = pd.read_parquet(Path(store.repo_path) / CODES_FILE, columns=["item_id"])
    items_df = store.get_historical_features(
        entity_df=pd.DataFrame(
            {
                "item_id": catalog["item_id"].to_numpy(np.int64),
                "event_timestamp": pd.Timestamp.now(tz="UTC"),
            }
        ),
        features=[f"qarm:rq_code_l{i + 1}" for i in range(n_levels)]
        + ["qarm:vq_codes", "item_content:raw_emb"],
    ).to_df()
    vq_k = max(len(v) for v in items_df["vq_codes"])
    vocab = CodeVocab(np.unique(np.concatenate(items_df["vq_codes"].to_list())))
    id_vocab = CodeVocab(np.unique(df["item_id"]))
    user_vocab = CodeVocab(np.unique(df["user_id"]))
    table = ItemTable(items_df, n_levels, vq_k, vocab, id_vocab)
    hist = _stack(df["hist_item_ids"], args.history, -1, np.int64)
    batch = {
        "user": torch.from_numpy(user_vocab.map(df["user_id"]) + 1),
        "target": torch.from_numpy(table.rows(df["item_id"])),
        "hist": torch.from_numpy(
            np.where(hist >= 0, table.rows(hist.ravel()).reshape(hist.shape), -1)
        ),
        "y": torch.from_numpy(df["label"].to_numpy(np.float32)),
    }
    hist_label = torch.ones_like(batch["hist"])  # user_history holds positives only
    cfg = RankerConfig(
        n_users=len(user_vocab) + 1,
        n_item_ids=len(id_vocab) + 1,
        dim=32,
        dense_dim=table.features.dense.shape[1],
        rq_levels=n_levels,
        rq_codes=args.n_codes,
        vq_vocab=len(vocab),
        vq_k=vq_k,
        prefix_buckets=1 << 13,
    )
    torch.manual_seed(0)
    model = DINRanker(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    n = len(df)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(n)
        tot = 0.0
        for a in range(0, n, 1024):
            s = perm[a : a + 1024]
            logits = model(
                table.features,
                batch["user"][s],
                batch["target"][s],
                batch["hist"][s],
                hist_label[s],
            )
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["y"][s])
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * s.numel()
        log.info("epoch %d: train log-loss %.4f", epoch + 1, tot / n)
    return model, (vocab, id_vocab, user_vocab, n_levels, vq_k)


def serve(store, model, vocabs, test_rows: pd.DataFrame, raw_by_id: dict, args) -> pd.DataFrame:
    """Score (user, item) candidates from online features; cold items via qarm_cold."""
    import torch

    vocab, id_vocab, user_vocab, n_levels, vq_k = vocabs
    service = store.get_feature_service(SERVICE)
    entity_rows = [
        {"user_id": int(u), "item_id": int(i)}
        for u, i in zip(test_rows["user_id"], test_rows["item_id"])
    ]
    t0 = time.perf_counter()
    online = store.get_online_features(features=service, entity_rows=entity_rows).to_df()
    missing = online["qarm_version"].isna().to_numpy()  # NOT_FOUND: an item the store lacks
    if missing.any():
        cold_refs = [f"qarm_cold:rq_code_l{i + 1}" for i in range(n_levels)]
        cold_refs += ["qarm_cold:vq_codes", "qarm_cold:qarm_error"]
        ids = online.loc[missing, "item_id"].to_numpy(np.int64)
        cold = store.get_online_features(
            features=cold_refs,
            entity_rows=[{"raw_emb": [float(x) for x in raw_by_id[i]]} for i in ids],
        ).to_df()
        bad = cold["qarm_error"].fillna("").str.len() > 0
        if bad.any():
            raise RuntimeError(f"qarm_cold refused rows: {cold.loc[bad, 'qarm_error'].iloc[0]}")
        for c in [f"rq_code_l{i + 1}" for i in range(n_levels)] + ["vq_codes"]:
            online.loc[missing, c] = pd.Series(list(cold[c]), index=online.index[missing])
        online.loc[missing, "raw_emb"] = pd.Series(
            [raw_by_id[i] for i in ids], index=online.index[missing]
        )
    # History items are catalog items: one more online read for their features.
    hist = _stack(online["hist_item_ids"], args.history, -1, np.int64)
    hist_ids = np.unique(hist[hist >= 0])
    hist_df = (
        store.get_online_features(
            features=[f"qarm:rq_code_l{i + 1}" for i in range(n_levels)]
            + ["qarm:vq_codes", "item_content:raw_emb"],
            entity_rows=[{"item_id": int(i)} for i in hist_ids],
        ).to_df()
        if hist_ids.size
        else online.iloc[:0]
    )
    cols = ["item_id"] + [f"rq_code_l{i + 1}" for i in range(n_levels)] + ["vq_codes", "raw_emb"]
    table = ItemTable(
        pd.concat([online[cols], hist_df[cols]], ignore_index=True), n_levels, vq_k, vocab, id_vocab
    )
    log.info(
        "online reads for %d candidates (%d cold) in %.2f s",
        len(online),
        int(missing.sum()),
        time.perf_counter() - t0,
    )
    hist_rows = np.where(hist >= 0, table.rows(hist.ravel()).reshape(hist.shape), -1)
    model.eval()
    with torch.no_grad():
        scores = model(
            table.features,
            torch.from_numpy(user_vocab.map(online["user_id"]) + 1),
            torch.from_numpy(table.rows(online["item_id"])),
            torch.from_numpy(hist_rows),
            torch.ones(hist_rows.shape, dtype=torch.long),
        ).numpy()
    return pd.DataFrame(
        {
            "user_id": online["user_id"],
            "item_id": online["item_id"],
            "cold": missing,
            "score": scores,
        }
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, help="a bundle to serve (default: build one)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument(
        "--max-train-rows",
        type=int,
        default=20_000,
        help="train events retrieved (point in time, from the DuckDB offline store)",
    )
    p.add_argument("--n-test", type=int, default=3000, help="test candidates to score")
    p.add_argument("--history", type=int, default=20, help="history length (user_history)")
    p.add_argument("--cache-dir", type=Path)
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    log.setLevel(logging.INFO)
    import torch

    torch.set_num_threads(1)
    from qarm_features.build.bundles import build_bundle
    from qarm_features.metrics import auc

    ids, raw, train_df, test_df, cold = load_data(args.cache_dir)
    warm_rows = ~np.isin(ids, cold)
    workdir = Path(tempfile.mkdtemp(prefix="qarm-feast-ranker-"))
    try:
        bundle = args.bundle
        if bundle is None:
            log.info("building a bundle on train events and the warm catalog")
            bundle = build_bundle(
                workdir / "bundle",
                item_ids=ids[warm_rows],
                raw_emb=raw[warm_rows],
                interactions=train_df,
            ).path
        from qarm_features.bundle.artifact import load_bundle

        args.n_codes = load_bundle(bundle).n_codes
        repo = materialize_repo(Path(bundle), workdir, train_df)
        from qarm_features.feast.store import open_store

        store = open_store(repo)
        model, vocabs = train(store, train_df, args)
        sample = test_df.sample(min(args.n_test, len(test_df)), random_state=0)
        raw_by_id = dict(zip(ids.tolist(), raw))
        scored = serve(store, model, vocabs, sample, raw_by_id, args)
        y = (sample["rating"].to_numpy() >= 4).astype(np.int8)
        s = scored["score"].to_numpy()
        c = scored["cold"].to_numpy()
        print(
            f"scored {len(scored)} test candidates from online features "
            f"({int(c.sum())} cold via qarm_cold): AUC all {auc(y, s):.4f}, "
            f"warm {auc(y[~c], s[~c]):.4f}, cold {auc(y[c], s[c]):.4f}"
        )
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

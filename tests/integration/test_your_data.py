"""A team's own data and its own Feast repo, through the CLI as a user types it.

A synthetic shop: string SKUs with titles and descriptions and small image files,
implicit clicks (no ratings), parquet; an existing Feast repo with its own ``product``
entity and a ``product_price`` view. `qarm init --into`, `qarm build --repo`, `qarm
materialize --repo`, `qarm push` run as subprocesses from another working directory; one
``get_online_features`` call returns the shop's price and the QARM codes of the same
products; a cold product gets its codes through the on-demand view, equal to the batch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.integration.helpers import online, run_feast, subprocess_env

pytestmark = [pytest.mark.slow]

QARM = Path(sys.executable).parent / "qarm"
WORDS = ("red blue green black white wool cotton linen silk denim leather canvas shirt "
         "dress coat scarf boot sneaker bag belt hat sock jacket skirt").split()  # fmt: skip

SHOP_DEFINITIONS = """\
# The shop's own feature repo: its product entity and a price view (no QARM in it).
from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.types import Float32

product = Entity(name="product", join_keys=["sku"], value_type=ValueType.STRING)

price_source = FileSource(name="price_source", path="data/price.parquet",
                          timestamp_field="event_timestamp")

product_price = FeatureView(name="product_price", entities=[product], ttl=timedelta(0),
                            schema=[Field(name="price", dtype=Float32)], source=price_source)
"""

FEATURE_STORE = """\
project: shop
provider: local
registry: data/registry.db
online_store: {type: sqlite, path: data/online_store.db}
offline_store: {type: file}
entity_key_serialization_version: 3
"""

QARM_YAML = """\
catalog:
  path: data/items.parquet
  id: sku
  text: "{title}. {description}"
events:
  path: data/clicks.parquet
  user: visitor
  item: sku
  timestamp: ts
  unknown_items: drop
entity: {name: product, join_key: sku}
build:
  pairs: {mf_epochs: 3, swing_top_k: 10}
  aligner: {out_dim: 32, max_epochs: 3, batch_size: 128}
  rq: {n_levels: 2, n_codes: 16}
  vq: {k: 5}
"""


def qarm(*args: str, cwd: Path, home: Path, stderr: list | None = None) -> str:
    """``qarm ARGS``'s stdout (its stderr appended to ``stderr`` when given)."""
    proc = subprocess.run(
        [str(QARM), *args], cwd=cwd, env=subprocess_env(home), capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    if proc.returncode != 0:
        raise AssertionError(
            f"qarm {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    if stderr is not None:
        stderr.append(proc.stderr)
    return proc.stdout


def _shop(root: Path) -> Path:
    """The shop's data (a catalog with two groups of co-clicked products) and its repo."""
    from PIL import Image

    rng = np.random.default_rng(0)
    repo = root / "shop"
    (repo / "data" / "img").mkdir(parents=True)
    (repo / "feature_store.yaml").write_text(FEATURE_STORE)
    (repo / "shop_features.py").write_text(SHOP_DEFINITIONS)
    n = 240
    skus = [f"SKU-{i:05d}" for i in range(n)]
    titles = [" ".join(rng.choice(WORDS, 3)) for _ in range(n)]
    for i in range(n):
        Image.new("RGB", (8, 8), tuple(int(c) for c in rng.integers(0, 255, 3))).save(
            repo / "data" / "img" / f"{i}.png"
        )
    pd.DataFrame(
        {"sku": skus, "title": titles, "description": [f"a {t} for every day" for t in titles],
         "image_path": [f"img/{i}.png" for i in range(n)]}
    ).to_parquet(repo / "data" / "items.parquet")  # fmt: skip
    group = rng.integers(0, 8, n)  # visitors click within a taste group
    rows = []
    for v in range(400):
        g = rng.integers(0, 8)
        items = rng.choice(np.flatnonzero(group == g), size=8)
        t0 = datetime(2025, 3, 1, tzinfo=timezone.utc) + timedelta(hours=int(rng.integers(0, 900)))
        rows += [(f"visitor-{v}", skus[i], t0 + timedelta(minutes=k)) for k, i in enumerate(items)]
    rows.append(("visitor-0", "SKU-GONE", t0))  # a product no longer in the catalog
    pd.DataFrame(rows, columns=["visitor", "sku", "ts"]).to_parquet(
        repo / "data" / "clicks.parquet"
    )
    pd.DataFrame(
        {"sku": skus, "price": rng.uniform(5, 200, n).astype(np.float32),
         "event_timestamp": pd.Timestamp("2025-01-01", tz="UTC")}
    ).to_parquet(repo / "data" / "price.parquet")  # fmt: skip
    return repo


def _walkthrough() -> tuple[list[str], str]:
    """The README's "Your own data" walkthrough: its shell commands and its Python block."""
    from tests.integration.helpers import ROOT

    text = (ROOT / "README.md").read_text()
    blocks = []
    for part in text.split("<!-- walkthrough")[1:]:
        fence = part.index("```")
        body = part[fence:].split("\n", 1)[1]
        blocks.append(body[: body.index("```")])
    commands = [line.split("#")[0].strip() for line in blocks[0].splitlines()]
    return [c for c in commands if c], blocks[1]


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """The shop after the README's walkthrough, run as written from the shop's parent."""
    root = tmp_path_factory.mktemp("shop")
    repo = _shop(root)
    commands, _ = _walkthrough()
    assert [c.split()[:2] for c in commands] == [
        ["qarm", "init"], ["$EDITOR", "shop/qarm.yaml"], ["qarm", "build"],
        ["qarm", "materialize"], ["qarm", "status"], ["qarm", "evaluate"],
    ]  # fmt: skip
    said, errs = [], []
    for command in commands:
        if command.startswith("$EDITOR"):
            assert "from shop_features import product" in (repo / "qarm_definitions.py").read_text()
            (repo / "qarm.yaml").write_text(QARM_YAML)  # the team fills in its config
            continue
        said.append(qarm(*command.split()[1:], cwd=root, home=root, stderr=errs))
    (root / "walkthrough.out").write_text("\n".join(said))
    (root / "walkthrough.err").write_text("\n".join(errs))
    end = (datetime.now(timezone.utc) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")
    run_feast(["materialize", "1970-01-01T00:00:00", end], repo)  # the shop's own price view
    return repo


def test_materialize_says_whose_views_it_wrote(shop):
    """`qarm materialize --repo` also materializes the shop's own view: it says so, in a
    short summary (not the statistics dict; that is --json)."""
    said = (shop.parent / "walkthrough.out").read_text()
    start = said.index("materialized ")
    summary = said[start : said.index('{\n  "ok"', start)]  # up to `qarm status`'s report
    ours = summary[summary.index("QARM's views:"):summary.index("items")]
    assert "qarm" in ours and "item_content" in ours and "240 items" in summary, summary
    assert "the team's views, materialized too" in summary and "product_price" in summary
    lines = [line for line in summary.splitlines() if line.strip()]
    assert len(lines) <= 8 and '"stages"' not in summary, summary  # rich may wrap a line


def test_the_walkthrough_warns_nothing_the_user_cannot_act_on(shop):
    """Feast's "experimental" on-demand-view warning, ibis' fetch_arrow_table deprecation,
    transformers' "Loading weights" bars: none reaches the walkthrough's stderr."""
    err = (shop.parent / "walkthrough.err").read_text()
    for noise in ("experimental feature", "fetch_arrow_table", "Loading weights"):
        assert noise not in err, err


def test_the_readme_python_snippet_runs_as_written(shop, monkeypatch):
    """As written, nothing given: it makes the cold product's embedding itself
    (`content_embeddings`), and its codes are those the batch path gives that text."""
    _, snippet = _walkthrough()
    monkeypatch.chdir(shop.parent)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # as written: no error
    store = namespace["store"]  # the store the snippet opened from the shop's parent
    warm = store.get_online_features(
        features=["product_price:price", "qarm:rq_code_l1"], entity_rows=[{"sku": "SKU-00003"}]
    ).to_dict()
    assert warm["price"][0] is not None and warm["rq_code_l1"][0] is not None
    cold = namespace["cold"]
    want = _expected(shop, ["SKU-NEW"], ["green silk scarf. a green silk scarf for every day"])
    assert cold["qarm_error"] == [""], cold
    assert cold["rq_code_l1"] == [int(want["rq_code_l1"][0])]
    assert [int(c) for c in cold["vq_codes"][0]] == [int(c) for c in want["vq_codes"][0]]


def test_training_rows_after_switching_the_offline_store_as_told(shop, tmp_path, monkeypatch):
    """`qarm init --into` says the shop's file offline store loses training rows and what
    to set; with that set, the shop's own view and QARM's come back for every event."""
    from feast import FeatureStore

    from qarm_features.feast.scaffold import OFFLINE_STORE

    said = (shop.parent / "walkthrough.out").read_text().replace("\n", " ")
    assert "drops training rows" in said and f"type: {OFFLINE_STORE}" in said
    repo = tmp_path / "shop"  # a copy: the other tests keep the shop as the team wrote it
    shutil.copytree(shop, repo, symlinks=True)
    yaml = repo / "feature_store.yaml"
    yaml.write_text(yaml.read_text().replace("{type: file}", f"{{type: {OFFLINE_STORE}}}"))
    clicks = pd.read_parquet(repo / "data" / "clicks.parquet").iloc[:300]
    late, early = pd.Timestamp("2025-03-02", tz="UTC"), pd.Timestamp("1960-01-01", tz="UTC")
    entity_df = pd.DataFrame(
        {
            "sku": clicks["sku"].tolist() + ["NO-SUCH-SKU", "SKU-00003"],
            # the last row precedes every row of the shop's price view and of QARM's
            "event_timestamp": pd.to_datetime(clicks["ts"], utc=True).tolist() + [late, early],
            "row": np.arange(len(clicks) + 2),
        }
    )
    monkeypatch.chdir(tmp_path)
    store = FeatureStore(repo_path=str(repo))
    features = ["product_price:price", "qarm:rq_code_l1", "qarm:qarm_version"]
    got = store.get_historical_features(entity_df=entity_df, features=features).to_df()
    got = got.set_index("row").loc[entity_df["row"]]
    assert len(got) == len(entity_df)
    known = got.iloc[:-2]
    in_catalog = known["sku"] != "SKU-GONE"
    assert known.loc[in_catalog.to_numpy(), ["price", "rq_code_l1"]].notna().all().all()
    assert got.iloc[-2:][["price", "rq_code_l1", "qarm_version"]].isna().all().all()


def _expected(repo: Path, skus: list[str], texts: list[str]) -> pd.DataFrame:
    from qarm_features.build.bundles import encode_catalog_text, latest_bundle
    from qarm_features.bundle.encode import encode_frame, get_bundle
    from qarm_features.project import load_project

    project = load_project(repo)
    bundle = get_bundle(latest_bundle(project.bundles_dir))
    raw = encode_catalog_text(texts, project.build)
    return encode_frame(bundle, pd.DataFrame({"item_id": skus, "raw_emb": list(raw)}))


def test_price_and_qarm_codes_in_one_call(shop, tmp_path, monkeypatch):
    from feast import FeatureStore

    monkeypatch.chdir(tmp_path)
    store = FeatureStore(repo_path=str(shop))
    skus = ["SKU-00003", "SKU-00117", "NO-SUCH-SKU"]
    values, statuses = online(
        store,
        ["product_price:price", "qarm:rq_code_l1", "qarm:rq_code_l2", "qarm:vq_codes",
         "qarm:qarm_version"],
        [{"sku": s} for s in skus],
    )  # fmt: skip
    items = pd.read_parquet(shop / "data" / "items.parquet").set_index("sku")
    texts = [f"{items.loc[s, 'title']}. {items.loc[s, 'description']}" for s in skus[:2]]
    want = _expected(shop, skus[:2], texts)
    price = pd.read_parquet(shop / "data" / "price.parquet").set_index("sku")["price"]
    for i, sku in enumerate(skus[:2]):
        assert values["price"][i] == pytest.approx(float(price[sku]))
        assert values["rq_code_l1"][i] == int(want["rq_code_l1"][i])
        assert values["rq_code_l2"][i] == int(want["rq_code_l2"][i])
        assert list(values["vq_codes"][i]) == want["vq_codes"][i].tolist()
        assert values["qarm_version"][i] == want["qarm_version"][i]
    # VQ codes of a string catalog are pool row indices (0 .. n-1), never the product itself
    assert all(0 <= c < len(items) for c in values["vq_codes"][0])
    assert items.index.get_loc("SKU-00003") not in list(values["vq_codes"][0])
    assert statuses["qarm_version"][2] == "NOT_FOUND"


def test_the_checked_read_on_string_ids(shop, tmp_path, monkeypatch):
    """The checked in-process read on the shop's `sku` key: a number is refused naming the
    row, as `qarm serve` refuses it (Feast alone would type the column from it)."""
    from feast import FeatureStore

    from qarm_features.errors import InputError
    from qarm_features.feast.serving import get_online_features

    monkeypatch.chdir(tmp_path)
    store = FeatureStore(repo_path=str(shop))
    refs = ["product_price:price", "qarm:rq_code_l1"]
    got = get_online_features(store, refs, [{"sku": "SKU-00003"}]).to_dict()
    assert got == store.get_online_features(refs, [{"sku": "SKU-00003"}]).to_dict()
    with pytest.raises(InputError, match="sku row 1: 3 is a number; sku ids are strings"):
        get_online_features(store, refs, [{"sku": "SKU-00003"}, {"sku": 3}])


def test_cold_product_from_another_directory_equals_batch(shop, tmp_path, monkeypatch):
    from feast import FeatureStore

    from qarm_features.build.bundles import encode_catalog_text
    from qarm_features.project import load_project

    monkeypatch.chdir(tmp_path)
    text = "green silk scarf. a green silk scarf for every day"
    raw = encode_catalog_text([text], load_project(shop).build)[0]
    names = ["rq_code_l1", "rq_code_l2", "vq_codes", "qarm_version", "qarm_error"]
    store = FeatureStore(repo_path=str(shop))
    values, _ = online(store, [f"qarm_cold:{n}" for n in names], [{"raw_emb": raw}])
    want = _expected(shop, ["NEW-1"], [text])
    assert values["qarm_error"] == [""]
    assert values["rq_code_l1"][0] == int(want["rq_code_l1"][0])
    assert list(values["vq_codes"][0]) == want["vq_codes"][0].tolist()


def test_push_new_products_then_read_them(shop, tmp_path):
    from feast import FeatureStore

    new = pd.DataFrame({"sku": ["NEW-7"], "title": ["black wool coat"],
                        "description": ["a black wool coat for every day"]})  # fmt: skip
    new.to_parquet(tmp_path / "new.parquet")
    out = qarm("push", "--repo", str(shop), str(tmp_path / "new.parquet"), "--json",
               cwd=tmp_path, home=tmp_path)  # fmt: skip
    assert '"n_items": 1' in out
    stats = json.loads(out)
    said = qarm("push", "--repo", str(shop), str(tmp_path / "new.parquet"), cwd=tmp_path,
                home=tmp_path)  # fmt: skip (the same item again: a summary, not a dict)
    assert "pushed 1 items' codes online and offline" in said and "NEW-7" in said
    assert "no rebuild due" in said and len(said.splitlines()) <= 4, said
    # the daily route: one new product among 240 needs no rebuild yet
    assert stats["n_added_since_build"] == 1 and stats["rebuild_due"] is False
    values, statuses = online(
        FeatureStore(repo_path=str(shop)), ["qarm:rq_code_l1"], [{"sku": "NEW-7"}]
    )
    want = _expected(shop, ["NEW-7"], ["black wool coat. a black wool coat for every day"])
    assert statuses["rq_code_l1"] == ["PRESENT"] and values["rq_code_l1"][0] == int(
        want["rq_code_l1"][0]
    )


def test_inspect_the_repos_newest_build(shop, tmp_path):
    out = qarm("inspect", "--repo", str(shop), cwd=tmp_path, home=tmp_path)
    assert "files verified" in out and "id_type=string" in out
    assert "added since the build:" in out and "rebuild due" in out
    report = json.loads(qarm("inspect", "--repo", str(shop), "--json", cwd=tmp_path,
                             home=tmp_path))["appended"]  # fmt: skip
    pushed = shop / "data" / "qarm_pushed.parquet"  # whatever earlier tests pushed
    skus = set(pd.read_parquet(pushed)["sku"]) if pushed.exists() else set()
    assert report["n_catalog"] == 240
    assert report["n_added"] == len({s for s in skus if not s.startswith("SKU-")})
    assert report["rebuild_due"] is (report["share_added"] > 0.1)


def test_status_and_repair_on_the_shop_repo(shop, tmp_path):
    """`qarm status` on a repo whose join key is `sku` (string ids), from another working
    directory: one version everywhere; a view a killed run left MATERIALIZING is found and
    `--repair` materializes it again (string ids through the repair path too)."""
    from feast.feature_view import FeatureViewState

    from qarm_features.feast.store import open_store

    said = (shop.parent / "walkthrough.out").read_text()
    status = said[said.rindex('{\n  "ok"') :]  # the walkthrough's `qarm status`
    report, _ = json.JSONDecoder().raw_decode(status)  # `qarm evaluate` prints after it
    version = report["version"]
    assert report["ok"] and report["versions"]["offline"] == [version]
    assert report["versions"]["online"] == [version]  # a sample of online rows, read by sku

    repo = tmp_path / "shop"  # a copy: the other tests keep the shop as the team wrote it
    shutil.copytree(shop, repo, symlinks=True)
    store = open_store(repo)
    fv = store.registry.get_feature_view("qarm", store.project)
    fv.state = FeatureViewState.MATERIALIZING  # what a kill -9 mid-materialize leaves
    store.registry.apply_feature_view(fv, store.project, commit=True)
    proc = subprocess.run([str(QARM), "status", "--repo", str(repo)], cwd=tmp_path,
                          env=subprocess_env(tmp_path), capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 1 and "view qarm is MATERIALIZING" in proc.stdout, proc.stdout
    report = json.loads(qarm("status", "--repo", str(repo), "--repair", cwd=tmp_path,
                             home=tmp_path))  # fmt: skip
    assert report["ok"] and report["repaired"] and report["views"]["qarm"] == "AVAILABLE_ONLINE"
    assert report["versions"]["online"] == [version]


def test_the_shop_repo_survives_feast_apply_twice(shop):
    run_feast(["apply"], shop)
    run_feast(["apply"], shop)
    end = (datetime.now(timezone.utc) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")
    run_feast(["materialize", "1970-01-01T00:00:00", end], shop)


def test_a_bad_catalog_is_refused_before_anything_is_written(shop, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("feature_store.yaml", "shop_features.py", "qarm_definitions.py"):
        (bad / f).write_text((shop / f).read_text())
    (bad / "qarm.yaml").write_text(QARM_YAML)
    (bad / "data").mkdir()
    items = pd.read_parquet(shop / "data" / "items.parquet")
    items.loc[5, "sku"] = items.loc[2, "sku"]
    items.to_parquet(bad / "data" / "items.parquet")
    proc = subprocess.run([str(QARM), "build", "--repo", str(bad)], cwd=tmp_path,
                          env=subprocess_env(tmp_path), capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 1
    said = " ".join(proc.stdout.split())  # rich wraps at a width the temp path decides
    assert "column 'sku': duplicate id 'SKU-00002' (rows [2, 5])" in said
    assert not (bad / "artifacts").exists()


GROUPLENS_YAML = """\
catalog:
  path: ml-100k/u.item              # id|title|release date|video date|url|19 genre flags
  csv:
    sep: "|"
    header: false
    encoding: latin-1
    names: [item_id, title, release, video, url, unknown, action, adventure, animation,
            children, comedy, crime, documentary, drama, fantasy, noir, horror, musical,
            mystery, romance, scifi, thriller, war, western]
  id: item_id
  text: "{title}"
events:
  path: ml-100k/u.data              # user, item, rating, unix seconds; tab separated
  csv: {sep: "\\t", header: false, names: [user_id, item_id, rating, timestamp]}
  rating: {column: rating, threshold: 4}
build:
  pairs: {mf_epochs: 3}             # the test's budget
  aligner: {max_epochs: 2}
"""


def _grouplens(dest: Path) -> Path:
    """MovieLens-100k written back in its GroupLens layout (u.item, u.data) from the cache."""
    from qarm_features.datasets.movielens import fetch_movielens_100k, load_movielens_100k

    ml = load_movielens_100k(fetch_movielens_100k())
    dest.mkdir(parents=True)
    items = ml.items
    flags = "|".join(["0"] * 19)
    lines = [
        f"{i}|{t} ({y})|01-Jan-{y}||http://x|{flags}" if pd.notna(y) else f"{i}|{t}||||{flags}"
        for i, t, y in zip(items["item_id"], items["title"], items["year"])
    ]
    (dest / "u.item").write_text("\n".join(lines) + "\n", encoding="latin-1")
    ml.interactions[["user_id", "item_id", "rating", "timestamp"]].astype({"rating": int}).to_csv(
        dest / "u.data", sep="\t", header=False, index=False
    )
    return dest


def test_movielens_grouplens_layout_builds_from_a_qarm_yaml(tmp_path, monkeypatch):
    """`qarm init` makes a repo that passes `feast apply` twice; MovieLens in its raw
    GroupLens layout (headerless, `|`- and tab-separated, latin-1) then builds from a
    qarm.yaml with no code."""
    from feast import FeatureStore

    repo = tmp_path / "ml_repo"
    qarm("init", str(repo), cwd=tmp_path, home=tmp_path)
    run_feast(["apply"], repo)
    run_feast(["apply"], repo)
    _grouplens(repo / "ml-100k")
    (repo / "qarm.yaml").write_text(GROUPLENS_YAML)
    qarm("build", "--repo", str(repo), cwd=tmp_path, home=tmp_path)
    qarm("materialize", "--repo", str(repo), cwd=tmp_path, home=tmp_path)
    run_feast(["apply"], repo)
    end = (datetime.now(timezone.utc) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")
    run_feast(["materialize", "1970-01-01T00:00:00", end], repo)
    monkeypatch.chdir(tmp_path)
    values, statuses = online(
        FeatureStore(repo_path=str(repo)), ["qarm:rq_code_l1", "qarm:vq_codes"],
        [{"item_id": 50}, {"item_id": 1683}],
    )  # fmt: skip
    assert statuses["rq_code_l1"] == ["PRESENT", "NOT_FOUND"]
    assert len(values["vq_codes"][0]) == 25 and 50 not in values["vq_codes"][0]


@pytest.mark.parametrize(
    ("path", "imports"),
    [
        ("entities/product.py", "from entities.product import product"),  # a sub-package
        ("my-defs.py", 'product = importlib.import_module("my-defs").product'),  # no identifier
    ],
)
def test_init_into_imports_the_entity_where_feast_apply_finds_it(tmp_path, path, imports):
    """The team's entity in a sub-package or a file whose name is not an identifier: the
    definitions `qarm init --into` writes pass the team's real `feast apply`."""
    repo = tmp_path / "shop"
    (repo / path).parent.mkdir(parents=True, exist_ok=True)
    (repo / "data").mkdir()
    (repo / "feature_store.yaml").write_text(FEATURE_STORE)
    (repo / path).write_text(SHOP_DEFINITIONS)
    qarm("init", "--into", str(repo), "--item-entity", "product", cwd=tmp_path, home=tmp_path)
    out = run_feast(["apply"], repo).stdout
    assert "qarm" in out and "product_price" in out, out
    listed = run_feast(["feature-views", "list"], repo).stdout
    assert "qarm" in listed and "product_price" in listed, listed
    written = (repo / "qarm_definitions.py").read_text()
    assert imports.replace('"', "'") in written.replace('"', "'"), written

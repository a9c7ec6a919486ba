"""The ``qarm`` command line.

    qarm init DIR | --into REPO --item-entity NAME   a QARM repo, or QARM in an existing one
    qarm build [--repo R]                  encode -> pairs -> aligner -> codes -> bundle
                                           (R: a repo with a qarm.yaml; default the demo)
    qarm materialize [--repo R]            bundle -> offline sources -> feast materialize
    qarm push --repo R ITEMS               new items' codes online, no batch rerun
    qarm status [--repo R] [--repair]      what a repo serves; repair what a crash left
    qarm serve --repo R [-p PORT]          HTTP serving: checked, bounded, read-only by default
    qarm inspect BUNDLE                    verify a bundle, print its metrics (exit 1 if bad)
    qarm datasets fetch NAME [--from ZIP]  put a data set (movielens-100k, movielens-1m) and
                                           its tables in the cache (--from: a local copy)
    qarm run                               the MovieLens demo end to end (build + serve + sample)
    qarm evaluate [--repo R]               does QARM lift a ranker on R's data? (A/B report)

The benchmark suite is not part of the installed package: ``python -m benchmarks`` from a
source checkout (``make bench``).

Heavy imports happen inside each command so ``qarm --help`` is instant.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from qarm_features.app.render import (
    abbreviate,
    print_inspect,
    print_materialize,
    print_metrics,
    print_push,
    stage_progress,
)
from qarm_features.errors import ConfigError, QarmError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # main() turns environment faults into one line
    help="QARM aligned embeddings and trainable code ids, served through Feast.",
)
datasets_app = typer.Typer(no_args_is_help=True, help="Fetch data sets into the cache.")
app.add_typer(datasets_app, name="datasets")
console = Console()

_FEAST_ODFV_WARNING = "On demand feature view is an experimental feature"
DEFAULT_REPO = Path("feature_repo")  # the demo repo: its qarm.yaml reads MovieLens-100k


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=1)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


@datasets_app.command("fetch")
def datasets_fetch(
    name: Annotated[
        str, typer.Argument(help="Data set name: movielens-100k or movielens-1m.")
    ] = "movielens-100k",
    from_: Annotated[
        Optional[Path],
        typer.Option(
            "--from",
            help="A local copy to take instead of downloading: the GroupLens zip "
            "(ml-1m.zip, ml-100k.zip) or its unpacked folder. Checked, then copied into the "
            "cache (replacing an earlier copy).",
        ),
    ] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Cache directory.")] = None,
) -> None:
    """Put a data set and its tidy tables in the cache (a qarm.yaml names it: `dataset:`).

    Downloads from GroupLens where the network allows; `--from` takes a local copy.
    """
    from qarm_features.datasets.movielens import dataset_tables

    try:
        with console.status(f"fetching {name}"):
            path = dataset_tables(name, cache_dir, source=from_)
    except QarmError as exc:
        _fail(exc)
    console.print(f"{name} is at [bold]{path}[/]")


@app.command()
def build(
    repo: Annotated[
        Path, typer.Option(help="A feature repo with a qarm.yaml (default: the demo repo).")
    ] = DEFAULT_REPO,
    out: Annotated[
        Optional[Path],
        typer.Option(
            help="Bundles directory (bundles go to OUT/<version>/; default: the repo's "
            "qarm.yaml `bundles`)."
        ),
    ] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Embedding cache.")] = None,
    warm_start: Annotated[
        Optional[Path],
        typer.Option(help="The previous bundle: keep its code ids, record the churn."),
    ] = None,
    verbose: bool = False,
) -> None:
    """Build a QARM bundle (encode, mine pairs, align, fit codes) from a repo's qarm.yaml.

    The catalog and events its qarm.yaml names; the build config is its `build:` section
    (the demo repo feature_repo/ is MovieLens-100k). Bundles are immutable and
    version-named: nothing that exists is ever deleted.
    """
    _setup_logging(verbose)
    from qarm_features.build.repo import build_from_repo

    try:
        with stage_progress(console) as (on_progress, on_step):
            result = build_from_repo(
                repo,
                cache_dir=cache_dir,
                on_step=on_step,
                out=out,
                warm_start=warm_start,
                on_progress=on_progress,
            )
    except QarmError as exc:
        _fail(exc)
    console.print(f"bundle [bold]{result.version}[/] written to {result.path}")
    print_metrics(result.metrics, timings=result.timings)


@app.command()
def inspect(
    bundle: Annotated[
        Optional[Path],
        typer.Argument(help="Bundle directory (default: the newest build of --repo)."),
    ] = None,
    repo: Annotated[
        Optional[Path],
        typer.Option(
            help="A repo with a qarm.yaml: its newest build (unless BUNDLE), the items pushed "
            "there since that build, and whether a rebuild is due."
        ),
    ] = None,
    against: Annotated[
        Optional[Path], typer.Option(help="An older bundle: print the churn of codes from it.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Verify a bundle (hashes, shapes, dtypes) and print its metrics; exit 1 if it is bad.

    With --repo, also the items added since the build (``qarm push``) and whether a rebuild
    is due (share of the catalog added, residual-error drift of the new items).
    """
    from qarm_features.build.bundles import latest_bundle
    from qarm_features.bundle.artifact import load_bundle
    from qarm_features.project import load_project

    try:
        path = bundle or latest_bundle(load_project(repo or DEFAULT_REPO).bundles_dir)
        b = load_bundle(path)
        report = added = None
        if against is not None:
            from qarm_features.build.stable import churn

            report = {"against": str(against), **churn(b, load_bundle(against))}
        if repo is not None:
            from qarm_features.feast.serving import appended

            added = appended(load_project(repo).repo, path)
    except QarmError as exc:
        _fail(exc)
    if as_json:
        out = b.manifest.model_dump(mode="json")
        out["vq_codes"] = {"space": b.vq_code_space, "vocab_size": b.vq_vocab_size}
        if report is not None:
            out["churn"] = report
        if added is not None:
            out["appended"] = added
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
        return
    print_inspect(path, b, churn=report, appended=added)


def _materialize(repo: Path, bundle: Optional[Path], **options) -> dict:
    """The repo's newest build (or ``bundle``) through :func:`materialize`, keyed on the
    item entity its declarations give; the user-side view from its events.

    ``options``: :func:`qarm_features.feast.job.materialize`'s (promote, keep_previous,
    progress, fs_yaml_file).
    """
    from qarm_features.build.bundles import latest_bundle
    from qarm_features.build.repo import item_entity, read_repo
    from qarm_features.feast.job import materialize as run_materialize
    from qarm_features.project import load_project

    project = load_project(repo)
    join_key = item_entity(project).join_key  # a mismatch stops before any write
    data = read_repo(project)
    bundle = bundle or latest_bundle(data.project.bundles_dir)
    return run_materialize(
        bundle,
        data.project.repo,
        interactions_df=data.history_interactions,
        positive_threshold=data.threshold,
        join_key=join_key,
        **options,
    )


@app.command()
def materialize(
    repo: Annotated[Path, typer.Option(help="Feast feature repo.")] = DEFAULT_REPO,
    bundle: Annotated[
        Optional[Path], typer.Option(help="Bundle directory (default: the newest build).")
    ] = None,
    promote: Annotated[
        bool, typer.Option(help="Let this bundle replace another version the store serves.")
    ] = False,
    keep_previous: Annotated[
        bool,
        typer.Option(help="With --promote: keep serving the previous version as `qarm_prev`."),
    ] = False,
    feature_store_yaml: Annotated[
        Optional[Path],
        typer.Option(
            "--feature-store-yaml",
            "-f",
            help="Another config of the repo, e.g. feature_store.ray.yaml (relative: in the repo).",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print every statistic (a JSON object).")
    ] = False,
    verbose: bool = False,
) -> None:
    """Encode every catalog item with the bundle, write offline sources, feast materialize.

    Every feature view of the repo is materialized: QARM's (from the sources this writes)
    and the team's own (from theirs, up to now); the summary names which is which.

    A store that already serves another bundle version is refused unless ``--promote``:
    codes of two bundles are never mixed silently (docs/feast.md, "rollout").
    """
    _setup_logging(verbose)
    import warnings

    # Feast's modules reset the RuntimeWarning filters when imported (simplefilter("once")):
    # imported first, so that the filter below holds
    import feast  # noqa: F401

    try:
        with stage_progress(console) as (on_progress, _), warnings.catch_warnings():
            # Feast warns on every apply of a repo with on-demand views; QARM's are its
            # request path, documented (docs/feast.md), nothing for the user to act on
            warnings.filterwarnings("ignore", _FEAST_ODFV_WARNING, RuntimeWarning)
            stats = _materialize(
                repo,
                bundle,
                promote=promote,
                keep_previous=keep_previous,
                progress=on_progress,
                fs_yaml_file=feature_store_yaml,
            )
    except QarmError as exc:
        _fail(exc)
    if as_json:
        console.print_json(data=stats)
    else:
        print_materialize(stats)


@app.command()
def status(
    repo: Annotated[Path, typer.Option(help="Feast feature repo.")] = DEFAULT_REPO,
    repair: Annotated[
        bool, typer.Option(help="Fix what a crash left: stuck views, stale tags, temp files.")
    ] = False,
) -> None:
    """What the repo serves, view states, versions, anything half-done; exit 1 on a problem."""
    import contextlib

    from qarm_features.feast.serving import status as repo_status

    try:
        with contextlib.redirect_stdout(sys.stderr):  # Feast prints progress on stdout
            report = repo_status(repo, repair=repair)
    except QarmError as exc:
        _fail(exc)
    console.print_json(data=report)
    if not report["ok"]:
        raise typer.Exit(code=1)


@app.command()
def serve(
    repo: Annotated[Path, typer.Option(help="Feast feature repo.")] = Path("."),
    feature_store_yaml: Annotated[
        Optional[Path],
        typer.Option("--feature-store-yaml", "-f", help="Another config of the repo."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", help="Port.")] = 6566,
    workers: Annotated[int, typer.Option("--workers", "-w", help="Worker processes.")] = 1,
    max_body_bytes: Annotated[
        Optional[int], typer.Option(help="Largest request body; 413 beyond (default 24 MiB).")
    ] = None,
    max_entity_rows: Annotated[
        Optional[int], typer.Option(help="Most entity rows per read; 413 beyond.")
    ] = None,
    header_timeout: Annotated[
        Optional[float], typer.Option(help="Seconds a connection may take to send headers.")
    ] = None,
    body_timeout: Annotated[
        Optional[float], typer.Option(help="Seconds to wait for each part of a body (408).")
    ] = None,
    keep_alive_timeout: Annotated[int, typer.Option(help="Idle keep-alive seconds.")] = 30,
    registry_ttl_sec: Annotated[int, typer.Option(help="Registry re-read period.")] = 60,
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = False,
    allow_writes: Annotated[
        bool,
        typer.Option(
            help="Accept Feast's write endpoints (/push, /write-to-online-store, "
            "/materialize, /materialize-incremental); they take no credentials."
        ),
    ] = False,
) -> None:
    """Serve a feature repo over HTTP: reads answered by qarm (cold rows by the views'
    UDFs), everything else by Feast's app, behind request checks, limits and /health.
    Read-only unless --allow-writes."""
    from qarm_features.feast.server import ServeLimits
    from qarm_features.feast.server import serve as run_server

    given = {
        "max_body_bytes": max_body_bytes,
        "max_entity_rows": max_entity_rows,
        "header_timeout_s": header_timeout,
        "body_timeout_s": body_timeout,
    }
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run_server(
        repo,
        host=host,
        port=port,
        workers=workers,
        fs_yaml_file=feature_store_yaml,
        limits=ServeLimits(**{k: v for k, v in given.items() if v is not None}),
        keep_alive_timeout=keep_alive_timeout,
        registry_ttl_sec=registry_ttl_sec,
        access_log=access_log,
        allow_writes=allow_writes,
    )


@app.command()
def push(
    items: Annotated[Path, typer.Argument(help="New items: a table in the catalog's format.")],
    repo: Annotated[Path, typer.Option(help="Feast feature repo with a qarm.yaml.")] = Path("."),
    as_json: Annotated[
        bool, typer.Option("--json", help="Print every statistic and every id (JSON).")
    ] = False,
    wait: Annotated[
        float,
        typer.Option(help="Seconds to wait for a promotion holding the repo's lock (0: refuse)."),
    ] = 0.0,
    verbose: bool = False,
) -> None:
    """Give new items their codes online now, with the served bundle (no batch rerun)."""
    _setup_logging(verbose)
    from qarm_features.build.repo import push_from_file

    try:
        with console.status("encoding and pushing"):
            stats = push_from_file(repo, items, lock_timeout=wait)
    except QarmError as exc:
        _fail(exc)
    if as_json:
        console.print_json(data=stats)
    else:
        print_push(stats)


@app.command()
def init(
    directory: Annotated[
        Optional[Path], typer.Argument(help="A new feature repo to create.")
    ] = None,
    into: Annotated[
        Optional[Path], typer.Option(help="An existing feature repo to add QARM to.")
    ] = None,
    item_entity: Annotated[
        Optional[str], typer.Option(help="With --into: the repo's item entity to key on.")
    ] = None,
    string_ids: Annotated[bool, typer.Option(help="New repo: string item ids.")] = False,
) -> None:
    """Write a new repo with QARM views, or add QARM to an existing repo (--into)."""
    from qarm_features.feast.scaffold import init_into, init_repo, offline_store_advice

    try:
        if (directory is None) == (into is None):
            raise ConfigError("give a new repo DIRECTORY, or --into REPO --item-entity NAME")
        if into is not None:
            if not item_entity:
                raise ConfigError("--into needs --item-entity NAME (the repo's item entity)")
            files = init_into(into, item_entity=item_entity)
        else:
            files = init_repo(directory, id_type="string" if string_ids else "int64")
    except QarmError as exc:
        _fail(exc)
    for f in files:
        console.print(f"wrote {f}")
    advice = offline_store_advice(into) if into is not None else None
    if advice:
        console.print(f"note: {advice}", markup=False, highlight=False)
    console.print(
        "next: edit qarm.yaml, then `qarm build --repo R` and `qarm materialize --repo R`"
    )


@app.command()
def run(
    repo: Annotated[Path, typer.Option(help="Feast feature repo.")] = DEFAULT_REPO,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Data/embedding cache.")] = None,
    verbose: bool = False,
) -> None:
    """The main job on the demo repo (feature_repo/qarm.yaml: MovieLens-100k): build a
    bundle, materialize it into Feast, read it back: `qarm build` then `qarm materialize`
    on that repo, the route every repo takes."""
    build(repo=repo, out=None, cache_dir=cache_dir, warm_start=None, verbose=verbose)
    from qarm_features.feast.serving import sample_online

    try:
        with stage_progress(console) as (on_progress, _):
            # the main job rebuilds the bundle, so it promotes the new version by design
            stats = _materialize(repo, None, promote=True, progress=on_progress)
        console.print("[bold]materialized[/]: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
        from qarm_features.bundle.encode import get_bundle

        b = get_bundle(stats["bundle"])  # loaded (and verified) once in this process
        # an unseen item: a catalog embedding with noise stands in for a brand-new title
        rng = __import__("numpy").random.default_rng(0)
        cold = b.raw_emb[0] + 0.05 * rng.standard_normal(b.raw_dim).astype("float32")
        sample = sample_online(repo, [int(i) for i in b.item_ids[:3]], cold.tolist())
    except QarmError as exc:
        _fail(exc)
    console.print(
        "[bold]get_online_features[/] (3 catalog items, then one cold item via qarm_cold):"
    )
    console.print_json(data=abbreviate(sample))


@app.command()
def evaluate(
    repo: Annotated[
        Path, typer.Option(help="A feature repo with a qarm.yaml (default: the demo repo).")
    ] = DEFAULT_REPO,
    out_dir: Annotated[Path, typer.Option(help="Report directory.")] = Path("reports"),
    seeds: Annotated[int, typer.Option(help="Number of seeds (the report uses 5).")] = 5,
    quick: Annotated[
        bool, typer.Option(help="Small budget: 1 seed, 1 epoch, variants A, B, D, B+D.")
    ] = False,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Data/embedding cache.")] = None,
    verbose: bool = False,
) -> None:
    """Does QARM lift a ranker on this repo's data? The offline A/B, written to
    OUT_DIR/<name>.{md,json,png} (name: qarm.yaml's `dataset`, else the repo folder).

    The repo's catalog and events through the build route (qarm.yaml's pairs, content and
    build sections): a temporal split, warm / cold / new items, the same ranker with ids
    only (A), + the frozen embedding (B), + QARM codes (D), both (B+D), paired intervals;
    every variant again with deepctr-torch's DeepFM, a ranker the project did not write.
    """
    _setup_logging(verbose)
    from qarm_features.app.evaluate import evaluate_repo
    from qarm_features.app.render import EvalProgress

    bar = EvalProgress(console)
    try:
        result = evaluate_repo(
            repo,
            out_dir=out_dir,
            seeds=tuple(range(seeds)),
            quick=quick,
            cache_dir=cache_dir,
            bar=bar,
        )
    except QarmError as exc:
        bar.close()
        _fail(exc)
    bar.close()
    sys.stdout.write(result["markdown"])
    console.print("report written to " + ", ".join(result["paths"].values()), markup=False)


def main() -> None:  # pragma: no cover - console-script shim
    """The console script: library errors are handled per command; faults of the
    environment (a read-only or full disk, a missing path, a corrupt SQLite or registry
    file, a bad feature_store.yaml) end in one line naming them, not a 60-line traceback.

    Feast's and protobuf's error classes are looked up only once a command has imported
    them (a ``FeastError`` cannot come from a run that never loaded Feast): importing Feast
    here would cost every command, ``--help`` included, ~9 s (it pulls torch).
    """
    import sqlite3

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        app()
    except Exception as exc:
        protobuf = sys.modules.get("google.protobuf.message")
        if protobuf is not None and isinstance(exc, protobuf.DecodeError):
            console.print(
                f"[bold red]error:[/] the repo's registry file is corrupt ({exc}); restore it, "
                "or delete it and re-run `qarm materialize`"
            )
            sys.exit(2)
        feast_errors = sys.modules.get("feast.errors")
        faults = (OSError, sqlite3.Error) + ((feast_errors.FeastError,) if feast_errors else ())
        if isinstance(exc, faults):
            console.print(f"[bold red]error:[/] {type(exc).__name__}: {exc}")
            sys.exit(2)
        raise


if __name__ == "__main__":  # pragma: no cover
    main()

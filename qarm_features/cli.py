"""The ``qarm`` command line.

    qarm datasets fetch movielens-100k     put the data set in the cache
    qarm build                             encode -> pairs -> aligner -> codes -> bundle
    qarm inspect BUNDLE                    verify a bundle, print its metrics (exit 1 if bad)
    qarm materialize                       bundle -> offline sources -> feast materialize
    qarm run                               the main job end to end (build + serve + sample)
    qarm evaluate                          the MovieLens-100k ranking evaluation report
    qarm bench                             the benchmark suite

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
from rich.table import Table

from qarm_features.errors import QarmError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="QARM aligned embeddings and trainable code ids, served through Feast.",
)
datasets_app = typer.Typer(no_args_is_help=True, help="Fetch data sets into the cache.")
app.add_typer(datasets_app, name="datasets")
console = Console()

DEFAULT_BUNDLE = Path("artifacts/bundle")
DEFAULT_REPO = Path("feature_repo")


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=1)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


def load_build_config(config_file: Optional[Path], overrides: list[str]):
    """Build a :class:`BuildConfig` from an optional JSON file plus ``a.b=value`` overrides."""
    from qarm_features.config import BuildConfig, parse_config
    from qarm_features.errors import ConfigError

    data: dict = {}
    if config_file is not None:
        try:
            data = json.loads(Path(config_file).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = parsed
    return parse_config(BuildConfig, data)


@datasets_app.command("fetch")
def datasets_fetch(
    name: Annotated[str, typer.Argument(help="Data set name: movielens-100k.")] = "movielens-100k",
    cache_dir: Annotated[Optional[Path], typer.Option(help="Cache directory.")] = None,
) -> None:
    """Download a data set into the cache (GroupLens, or the copy in the recbole wheel)."""
    from qarm_features.data import fetch_movielens_100k

    if name != "movielens-100k":
        _fail(ValueError(f"unknown data set {name!r}; available: movielens-100k"))
    try:
        with console.status("fetching movielens-100k"):
            path = fetch_movielens_100k(cache_dir)
    except QarmError as exc:
        _fail(exc)
    console.print(f"movielens-100k is at [bold]{path}[/]")


@app.command()
def build(
    out: Annotated[Path, typer.Option(help="Bundle directory to write.")] = DEFAULT_BUNDLE,
    config: Annotated[Optional[Path], typer.Option(help="BuildConfig as JSON.")] = None,
    set_: Annotated[
        list[str], typer.Option("--set", help="Override a config key, e.g. rq.n_levels=4.")
    ] = [],  # noqa: B006 - typer needs a literal default
    cache_dir: Annotated[Optional[Path], typer.Option(help="Data/embedding cache.")] = None,
    verbose: bool = False,
) -> None:
    """Build a QARM bundle from MovieLens-100k (encode, mine pairs, align, fit codes)."""
    _setup_logging(verbose)
    from qarm_features.build import build_movielens

    try:
        cfg = load_build_config(config, set_)
        with console.status("starting") as status:
            result = build_movielens(
                out,
                config=cfg,
                cache_dir=cache_dir,
                on_step=lambda label: status.update(f"[bold]{label}[/]"),
                progress=False,
            )
    except QarmError as exc:
        _fail(exc)
    console.print(f"bundle [bold]{result.version}[/] written to {result.path}")
    print_metrics(result.metrics, timings=result.timings)


def print_metrics(metrics: dict, *, timings: dict | None = None) -> None:
    """Render a bundle's metrics as tables: pairs, raw-vs-aligned, code quality."""
    pairs = metrics.get("pairs", {})
    if pairs:
        t = Table(title="pair mining", show_header=True)
        t.add_column("statistic")
        t.add_column("value", justify="right")
        for k, v in pairs.items():
            t.add_row(str(k), _fmt(v))
        console.print(t)
    held = metrics.get("heldout", {})
    if held:
        t = Table(
            title=f"held-out pairs ({metrics.get('heldout_items', '?')} items unseen by the aligner)"
        )
        t.add_column("space")
        for col in ("recall@10", "pair_auc", "n_pairs"):
            t.add_column(col, justify="right")
        for space, m in held.items():
            t.add_row(space, *(_fmt(m.get(c)) for c in ("recall@10", "pair_auc", "n_pairs")))
        console.print(t)
    codes = metrics.get("codes", {})
    if codes:
        t = Table(title="RQ code quality")
        t.add_column("space")
        keys = [
            k for k in next(iter(codes.values())).keys() if not isinstance(
                next(iter(codes.values()))[k], (list, dict))
        ]
        list_keys = [k for k, v in next(iter(codes.values())).items() if isinstance(v, list)]
        for k in keys + list_keys:
            t.add_column(k, justify="right")
        for space, m in codes.items():
            t.add_row(space, *(_fmt(m.get(k)) for k in keys + list_keys))
        console.print(t)
    aligner = metrics.get("aligner", {})
    if aligner:
        console.print(
            "aligner: " + ", ".join(f"{k}={_fmt(v)}" for k, v in aligner.items())
        )
    if timings:
        console.print("timings: " + ", ".join(f"{k}={v:.1f}" for k, v in timings.items()))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


@app.command()
def inspect(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")] = DEFAULT_BUNDLE,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Verify a bundle (hashes, shapes, dtypes) and print its metrics; exit 1 if it is bad."""
    from qarm_features.bundle import load_bundle

    try:
        b = load_bundle(bundle)
    except QarmError as exc:
        _fail(exc)
    if as_json:
        sys.stdout.write(json.dumps(b.manifest, indent=2) + "\n")
        return
    console.print(f"[green]ok[/] {bundle}: version [bold]{b.version}[/], files verified")
    console.print("dims: " + ", ".join(f"{k}={v}" for k, v in b.dims.items()))
    print_metrics(b.metrics)


def main() -> None:  # pragma: no cover - console-script shim
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

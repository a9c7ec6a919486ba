"""Rendering for the ``qarm`` command (rich): bundle metrics, sample reads, stage progress."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

console = Console()


def print_metrics(metrics: dict, *, timings: dict | None = None) -> None:
    """Render a bundle's metrics as tables: pairs, raw-vs-aligned, code quality."""
    pairs = metrics.get("pairs", {})
    if pairs:
        t = Table(title="pair mining", show_header=True)
        t.add_column("statistic")
        t.add_column("value", justify="right")
        for k, v in pairs.items():
            t.add_row(str(k), fmt(v))
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
            t.add_row(space, *(fmt(m.get(c)) for c in ("recall@10", "pair_auc", "n_pairs")))
        console.print(t)
    codes = metrics.get("codes", {})
    if codes:
        t = Table(title="RQ code quality (per-level lists are levels 1..L)")
        t.add_column("metric")
        spaces = list(codes)
        for space in spaces:
            t.add_column(space, justify="right")
        for key in codes[spaces[0]]:
            t.add_row(key, *(fmt(codes[sp].get(key)) for sp in spaces))
        console.print(t)
    aligner = metrics.get("aligner", {})
    if aligner:
        console.print("aligner: " + ", ".join(f"{k}={fmt(v)}" for k, v in aligner.items()))
    if timings:
        console.print("timings: " + ", ".join(f"{k}={v:.1f}" for k, v in timings.items()))
    check = metrics.get("alignment_check")
    if check:  # last: the verdict a team reads first
        print_alignment_check(check)


VERDICT_STYLE = {
    "better": "green",
    "inconclusive": "yellow",
    "not_better": "bold red",
    "unmeasured": "dim",
}


def print_alignment_check(check: dict) -> None:
    """One line: did alignment make the space better on held-out pairs (the manifest's
    ``alignment_check``)?"""
    verdict = check.get("verdict", "unmeasured")
    style = VERDICT_STYLE.get(verdict, "")
    if check.get("delta") is None:
        console.print(f"alignment check: [{style}]{verdict}[/] (no held-out pair)")
        return
    lo, hi = check["ci"]
    console.print(
        f"alignment check: [{style}]{verdict.replace('_', ' ')}[/]: held-out pair-AUC raw "
        f"{check['raw']:.4f} -> aligned {check['aligned']:.4f}, delta {check['delta']:+.4f} "
        f"(95% interval [{lo:+.4f}, {hi:+.4f}], {check['n_pairs']:,} pairs, "
        f"{check['n_items']:,} held-out items)"
    )


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, list):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    return str(v)


def abbreviate(obj, max_list: int = 6):
    """Shorten long float lists (aligned_emb) for display; code lists stay whole."""
    if isinstance(obj, dict):
        return {k: abbreviate(v, max_list) for k, v in obj.items()}
    if isinstance(obj, list):
        if len(obj) > max_list and all(isinstance(v, float) for v in obj):
            return [round(v, 4) for v in obj[:4]] + [f"... {len(obj)} floats"]
        return [abbreviate(v, max_list) for v in obj]
    return obj


class _Rate(ProgressColumn):
    """Rows (or steps) per second of a task."""

    def render(self, task):
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f}/s", style="progress.data.speed")


@contextmanager
def stage_progress(out: Console | None = None):
    """A rich progress display for the library's stages (:mod:`qarm_features.progress`).

    Yields ``(on_progress, on_step)``: ``on_progress(stage, total, advance)`` draws one bar
    per stage with its count, rate and ETA (a stage is finished when the next one starts);
    ``on_step(label)`` prints a step line above the bars.
    """
    bar = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=out or console,
    )
    tasks: dict[str, int] = {}

    def finish(task) -> None:
        t = bar.tasks[task]
        if not t.finished:
            bar.update(task, total=max(t.completed, 1), completed=max(t.completed, 1))

    def on_progress(name: str, total, advance: int) -> None:
        if advance == 0 or name not in tasks:
            for task in tasks.values():
                finish(task)
            tasks[name] = bar.add_task(name, total=total)
        if advance:
            bar.advance(tasks[name], advance)

    def on_step(label: str) -> None:
        bar.console.print(f"[dim]{label}[/]")

    with bar:
        yield on_progress, on_step
        for task in tasks.values():
            finish(task)


class EvalProgress:
    """``qarm evaluate``'s progress, per seed and variant: a rich bar on a terminal, one
    plain line per step otherwise (logs, CI). The methods of
    :class:`qarm_features.app.evaluate.NoBar`."""

    def __init__(self, out: Console | None = None):
        self.console = out or console
        self.live = self.console.is_terminal
        self.bar = None
        self.task = None
        self.total = self.done = 0
        self.phase = ""

    def start(self, total: int, phase: str) -> None:
        self.total, self.done, self.phase = int(total), 0, phase
        if not self.live:
            self.console.print(f"{phase}: {total} steps", markup=False, highlight=False)
            return
        if self.bar is None:
            self.bar = Progress(
                SpinnerColumn(),
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.bar.start()
        self.task = self.bar.add_task(phase, total=total)

    def set_description(self, label: str) -> None:
        if self.live and self.task is not None:
            self.bar.update(self.task, description=f"{self.phase}: {label}")
        else:
            self.console.print(
                f"[{self.done + 1}/{self.total}] {label}", markup=False, highlight=False
            )

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.live and self.task is not None:
            self.bar.advance(self.task, n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def print_inspect(path, bundle, *, churn: dict | None = None, appended: dict | None = None):
    """``qarm inspect``'s text: the verified bundle, its metrics, churn and added items."""
    console.print(f"[green]ok[/] {path}: version [bold]{bundle.version}[/], files verified")
    console.print("dims: " + ", ".join(f"{k}={v}" for k, v in bundle.dims.model_dump().items()))
    print_metrics(bundle.metrics)
    if churn is not None:
        console.print(f"churn from {churn['against']}: " + ", ".join(
            f"{k}={fmt(v)}" for k, v in churn.items() if k != "against"
        ))  # fmt: skip
    if appended is not None:
        drift = "-" if appended["drift"] is None else f"{appended['drift']:.2f}x"
        console.print(
            f"added since the build: {appended['n_added']} items "
            f"({appended['share_added']:.1%} of {appended['n_catalog']}), residual drift {drift}"
        )
        if appended["rebuild_due"]:
            console.print("[yellow]rebuild due[/]: " + "; ".join(appended["reasons"]))
        else:
            console.print("no rebuild due")

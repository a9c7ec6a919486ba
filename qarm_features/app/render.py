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
    """A progress display for the library's stages (:mod:`qarm_features.progress`).

    Yields ``(on_progress, on_step)``: ``on_progress(stage, total, advance)`` draws one bar
    per stage with its count, rate and ETA (a stage is finished when the next one starts);
    ``on_step(label)`` prints a step line above the bars.

    When the console is not a terminal (CI, ``nohup``, a log file) rich would show the bars
    only at the end: each stage step is then written as it happens, one plain line with
    its count, rate and ETA (:class:`PlainProgress`).
    """
    out = out or console
    if not out.is_terminal:
        plain = PlainProgress(out)
        yield plain.on_progress, plain.on_step
        plain.close()
        return
    bar = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=out,
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


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class PlainProgress:
    """Stage progress as plain lines, written as it goes (for a console that is not a
    terminal): ``<stage>: 3,000/10,000 (30%)  1,234/s  elapsed 0:02  ETA 0:06``.

    One line per stage step (each ``advance``); a stage whose steps come faster than
    ``every`` seconds writes at most one line per ``every`` seconds, and always its last
    (when it reaches its total, or ends because the next stage starts).
    """

    def __init__(self, out: Console, *, every: float = 1.0, clock=None):
        import time

        self.out, self.every, self.clock = out, every, clock or time.monotonic
        self._stage: dict | None = None

    def _line(self, text: str) -> None:
        self.out.print(text, markup=False, highlight=False, soft_wrap=True)
        self.out.file.flush()

    def _report(self, st: dict, *, final: bool = False) -> None:
        elapsed = max(self.clock() - st["t0"], 1e-9)
        done, total = st["done"], st["total"]
        rate = done / elapsed
        if total:
            count = f"{done:,}/{total:,} ({min(done / total, 1):.0%})"
        else:
            count = f"{done:,}"
        if final:
            eta = "done"
        elif total and rate > 0:
            eta = "ETA " + _duration(max(total - done, 0) / rate)
        else:
            eta = "ETA ?"
        self._line(f"{st['name']}: {count}  {rate:,.1f}/s  elapsed {_duration(elapsed)}  {eta}")
        st["shown"], st["last"] = done, self.clock()

    def _close_stage(self) -> None:
        st, self._stage = self._stage, None
        if st is not None and st["done"] and st["shown"] != st["done"]:
            self._report(st, final=True)

    def on_progress(self, name: str, total, advance: int) -> None:
        st = self._stage
        if advance == 0 or st is None or st["name"] != name:
            self._close_stage()
            now = self.clock()
            st = self._stage = {
                "name": name,
                "total": total,
                "done": 0,
                "t0": now,
                "last": now - self.every,
                "shown": 0,
            }
            self._line(f"{name}: started" + (f", {total:,} to do" if total else ""))
        if advance:
            st["done"] += int(advance)
            complete = bool(st["total"]) and st["done"] >= st["total"]
            if complete or self.clock() - st["last"] >= self.every:
                self._report(st, final=complete)

    def on_step(self, label: str) -> None:
        self._close_stage()
        self._line(label)

    def close(self) -> None:
        self._close_stage()


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
    space = {"item_id": "item ids", "catalog_row": "catalog row indices (item_keys maps them)"}
    console.print(
        f"VQ codes: {space[bundle.vq_code_space]}, vocabulary 0..{bundle.vq_vocab_size - 1} "
        f"(vq_vocab_size={bundle.vq_vocab_size}; -1 = missing)"
    )
    print_metrics(bundle.metrics)
    if churn is not None:
        console.print(
            f"churn from {churn['against']}: "
            + ", ".join(f"{k}={fmt(v)}" for k, v in churn.items() if k != "against")
        )
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


# Views whose sources `qarm materialize` writes (qarm_features.feast.views, the demo's
# user_history); any other view `feast materialize` reaches is the team's own.
_QARM_VIEWS = ("qarm", "qarm_batch", "qarm_prev", "item_content", "user_history")
_SHOWN_IDS = 5  # ids quoted in a push summary


def _names(names) -> str:
    return ", ".join(names) if names else "none"


def print_materialize(stats: dict) -> None:
    """``qarm materialize``'s summary: the version, the views written (QARM's and the
    team's), the rows, the time. ``--json`` prints ``stats`` whole."""
    views = list(stats.get("materialized_views", []))
    ours = [v for v in views if v in _QARM_VIEWS]
    theirs = [v for v in views if v not in _QARM_VIEWS]
    previous, version = stats.get("previous_version"), stats.get("version")
    if stats.get("promoted"):
        how = f"promoted from {previous}"
    elif previous is None:
        how = "first version served"
    else:
        how = "same version, rewritten"
    console.print(f"[green]materialized[/] {version} into {stats.get('repo', '?')} ({how})")
    pushed = stats.get("n_pushed_items_kept") or 0
    console.print(
        f"  QARM's views: {_names(ours)}: {stats.get('n_items', 0):,} items"
        + (f" ({pushed:,} pushed since the build, kept)" if pushed else "")
        + f", {stats.get('n_history_rows', 0):,} user-history rows"
    )
    if theirs:
        console.print(
            f"  the team's views, materialized too (from their own sources, up to now): "
            f"{_names(theirs)}"
        )
    for key, what in (
        ("kept_previous", "previous version still served as qarm_prev"),
        ("dropped_views", "dropped"),
        ("cleared_views", "cleared first"),
        ("empty_views", "empty sources, skipped"),
    ):
        value = stats.get(key)
        if value:
            console.print(f"  {what}: {value if isinstance(value, str) else _names(value)}")
    parts = (
        ("encode", "encode_seconds"),
        ("apply", "apply_seconds"),
        ("materialize", "materialize_seconds"),
    )
    timing = ", ".join(
        f"{name} {stats[key]:.1f} s"
        for name, key in parts
        if isinstance(stats.get(key), (int, float))
    )
    console.print(f"  {timing}; every statistic: --json")


def print_push(stats: dict) -> None:
    """``qarm push``'s summary: how many items, a few of their ids, where they went, and
    whether a rebuild is due. ``--json`` prints ``stats`` whole (every id)."""
    ids = [str(i) for i in stats.get("item_ids", [])]
    more = len(ids) - _SHOWN_IDS
    shown = ", ".join(ids[:_SHOWN_IDS]) + (f", ... ({more} more)" if more > 0 else "")
    where = "online and offline" if stats.get("offline") else "online"
    console.print(
        f"[green]pushed[/] {stats.get('n_items', len(ids)):,} items' codes {where} with "
        f"{stats.get('version')} in {stats.get('seconds', 0):.1f} s: {shown}"
    )
    if "n_added_since_build" in stats:
        console.print(f"  added since the build: {stats['n_added_since_build']:,} items")
        if stats.get("rebuild_due"):
            console.print(
                "  [yellow]rebuild due[/]: " + "; ".join(stats.get("rebuild_reasons", []))
            )
        else:
            console.print("  no rebuild due")
    console.print("  every id: --json")

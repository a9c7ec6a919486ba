"""Scaling: every offline stage, items 10k -> 1M and events 100k -> 20M, time and peak RSS.

Each run is one child process (:func:`benchmarks.timing.run_child`) that generates a world,
then runs the offline stages one after the other, timing each and reading its own peak
RSS (``VmHWM``, reset before each stage through ``/proc/self/clear_refs``) and its peak
anonymous RSS (``RssAnon`` sampled every 50 ms: ``peak_anon_mib``). The content is written
chunk by chunk to a ``.npy`` file and memory-mapped, as a team's content cache is read, so
``peak_rss_mib`` counts its resident (evictable) file pages and ``peak_anon_mib`` does not:

* ``retrieval``: the BPR-MF retrieval model U2I mining reads (:class:`BPRMF`);
* ``mining``: U2I + Swing + deduplication (:func:`mine_pairs` given those embeddings);
* ``aligner``: :class:`ItemAligner` on the pairs (``max_epochs`` capped, as in the issue);
* ``codes``: aligned space (``pipeline.align_catalog``, as ``qarm build``), RQ codebooks (sampled k-means) and VQ pool (exact or IVF),
  then RQ + VQ codes of every item (the batch path's work).

``pairs`` = ``retrieval`` + ``mining``. The world is :func:`scale_world`: the synthetic
world's content (384-d) with a Zipf-popular, cluster-following interaction log generated
in ``O(events)`` (:class:`~qarm_features.datasets.synthetic.SyntheticWorld.interactions` costs
``O(users x items)``, which 1M items cannot afford). ``reproduce`` runs the issue's
measurement instead: ``build_bundle`` on :class:`SyntheticWorld` itself.

Results: ``benchmarks/results/scale.json``, one record per run with ``n_items``,
``n_events`` and per stage ``seconds``, ``cpu_seconds`` (all threads; steadier than wall
time on a shared machine) and ``peak_rss_mib``, plus a least-squares fit of
seconds per event (pairs) and per item (aligner, codes). Sizes by environment:
``QARM_SCALE_RUNS="20000:400000,100000:2000000"`` (items:events).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._child import status_mib

# (n_items, n_events) of the default sweep: events grow 20x per item, as in the issue.
DEFAULT_RUNS = ((10_000, 100_000), (50_000, 1_000_000), (200_000, 4_000_000),
                (1_000_000, 20_000_000))
QUICK_RUNS = ((10_000, 100_000), (20_000, 400_000))
# The aligner trains on a seeded sample of at most this many pairs (it is O(pairs x epochs)
# at ~10-20k pairs/s here; all 20M+ pairs of the 1M-item world would take hours).
ALIGNER_MAX_PAIRS = 300_000
EVENTS_PER_USER = 20  # the synthetic world's default sequence length
ZIPF_EXPONENT = 0.9  # head item ~0.4% of events at 1M items (10^5 users at 20M events)
IN_CLUSTER = 0.8  # share of a user's events in their taste cluster


# ------------------------------------------------------------------ world
def scale_world(n_items: int, n_events: int, *, content_dim: int = 384, seed: int = 0,
                content_path: str | os.PathLike | None = None):
    """``(item_ids, content (n, d) float32, interactions)`` in O(items x d + events).

    ``content_path``: stream the content, chunk by chunk, into that ``.npy`` file and return
    it memory-mapped read-only (as a team's content cache is read): the catalog's content
    is then never resident as one anonymous array (5M items x 384 float32 = 7.7 GB).

    Items: the :class:`SyntheticWorld` content and taste clusters. Users: ``n_events / 20``,
    each with a taste cluster; each event picks, with probability 0.8, an item of the
    user's cluster, else any item, both by Zipf popularity (exponent 0.9 over a seeded
    rank permutation). Ratings: 5 for in-cluster items, uniform 1..5 otherwise.
    """
    import pandas as pd

    from qarm_features.datasets.synthetic import SyntheticWorld

    world = SyntheticWorld(n_items, 1, content_dim=content_dim, seed=seed)
    if content_path is None:
        content = world.content
    else:
        out = np.lib.format.open_memmap(content_path, mode="w+", dtype=np.float32,
                                        shape=(n_items, content_dim))
        row = 0
        for _, chunk in world.iter_content(65_536):
            out[row : row + len(chunk)] = chunk
            row += len(chunk)
        out.flush()
        del out
        content = np.load(content_path, mmap_mode="r")
    clusters = world.clusters
    rng = np.random.default_rng(seed)
    rank = rng.permutation(n_items)
    weight = 1.0 / (rank + 10.0) ** ZIPF_EXPONENT
    order = np.argsort(clusters, kind="stable")  # items grouped by cluster
    n_cl = int(clusters.max()) + 1
    bounds = np.searchsorted(clusters[order], np.arange(n_cl + 1))
    cdf_all = np.cumsum(weight)
    cdf_cl = np.cumsum(weight[order])  # within a cluster: a slice, offset by its start
    n_users = max(1, n_events // EVENTS_PER_USER)
    taste = clusters[rng.integers(0, n_items, n_users)]  # users follow item clusters
    user = np.repeat(np.arange(n_users), EVENTS_PER_USER)[:n_events]
    if user.size < n_events:
        user = np.r_[user, rng.integers(0, n_users, n_events - user.size)]
    inside = rng.random(n_events) < IN_CLUSTER
    item = np.empty(n_events, np.int64)
    c = taste[user[inside]]
    lo, hi = bounds[c], bounds[c + 1]
    base = np.where(lo > 0, cdf_cl[np.maximum(lo - 1, 0)], 0.0)
    target = base + rng.random(c.size) * (cdf_cl[hi - 1] - base)
    item[inside] = order[np.minimum(np.searchsorted(cdf_cl, target), hi - 1)]
    m = int((~inside).sum())
    item[~inside] = np.minimum(np.searchsorted(cdf_all, rng.random(m) * cdf_all[-1]), n_items - 1)
    in_cl = clusters[item] == taste[user]
    rating = np.where(in_cl, 5, rng.integers(1, 6, n_events)).astype(np.float32)
    # Distinct timestamps, users interleaved in time, each user's events increasing.
    ts = _per_user_sorted(880_000_000 + rng.permutation(n_events).astype(np.int64), user)
    df = pd.DataFrame(
        {"user_id": user.astype(np.int64) + 1, "item_id": item + 1, "rating": rating,
         "timestamp": ts}
    )
    return world.item_ids, content, df


def _per_user_sorted(ts: np.ndarray, user: np.ndarray) -> np.ndarray:
    """``ts`` re-ordered so that each user's run of events has increasing timestamps."""
    order = np.lexsort((ts, user))
    out = np.empty_like(ts)
    out[np.argsort(user, kind="stable")] = ts[order]
    return out


# ------------------------------------------------------------------ child side
def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # pragma: no cover - not Linux / not permitted: peaks accumulate
        pass


class _AnonPeak:
    """The stage's peak *anonymous* RSS (``RssAnon``: heap and arrays, not the page cache of
    memory-mapped files), sampled every 50 ms by a thread (a spike shorter than that can be
    missed; ``VmHWM`` cannot tell the two apart, and it counts every resident page of the
    memory-mapped content)."""

    def __init__(self) -> None:
        import threading

        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now_mib() -> float:
        return status_mib("RssAnon")

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.now_mib())

    def __enter__(self) -> _AnonPeak:
        self.peak = self.now_mib()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now_mib())


def _peak_mib() -> float:
    return status_mib("VmHWM")


def stages(n_items: int, n_events: int, max_epochs: int = 3, mf_epochs: int | None = None,
           seed: int = 0, n_threads: int = 2, aligner_max_pairs: int | None = ALIGNER_MAX_PAIRS,
           torch_threads: int = 1, sample_check_pairs: int | None = None) -> dict:
    """Child: generate the world, run every stage; ``{stage: {seconds, peak_rss_mib}}``.

    BLAS runs at ``n_threads`` (the coders pin their own workers to one BLAS thread);
    torch at ``torch_threads`` (1: the aligner's best setting here, bench_align measured 2
    threads at 0.17x of 1 on this shared machine). The aligner trains on at most
    ``aligner_max_pairs`` pairs (a seeded sample; ``None``: all): its cost is linear in
    pairs and the fit below gives it per pair. ``sample_check_pairs``: after the stages,
    :func:`aligner_sample_check` on this many pairs (``out["aligner_sample_check"]``).
    """
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(torch_threads)
    threadpool_limits(n_threads)
    from qarm_features.align.aligner import ItemAligner
    from qarm_features.build.pipeline import align_catalog, fit_quantizers
    from qarm_features.config import AlignerConfig, BuildConfig, PairsConfig
    from qarm_features.pairs.mining import mine_pairs
    from qarm_features.pairs.retrieval import BPRMF

    out: dict = {"n_items": n_items, "n_events": n_events, "max_epochs": max_epochs}
    cfg = BuildConfig()
    pcfg = cfg.pairs if mf_epochs is None else PairsConfig(mf_epochs=mf_epochs)
    out["mf_epochs"] = pcfg.mf_epochs

    def stage(name, fn):
        _reset_peak()
        t0, c0 = time.perf_counter(), time.process_time()
        with _AnonPeak() as anon:
            res = fn()
        out[name] = {"seconds": time.perf_counter() - t0, "peak_rss_mib": _peak_mib(),
                     "peak_anon_mib": anon.peak, "cpu_seconds": time.process_time() - c0}
        return res

    tmp = tempfile.TemporaryDirectory(prefix="qarm-scale-")  # the memory-mapped content
    ids, content, log = stage("generate", lambda: scale_world(
        n_items, n_events, seed=seed, content_path=os.path.join(tmp.name, "content.npy")))
    out["n_positives"] = int((log["rating"] >= pcfg.positive_threshold).sum())
    mf_ids, mf_emb = stage("retrieval", lambda: BPRMF.from_config(pcfg).fit(log).item_embeddings())
    pairs, pstats = stage(
        "mining", lambda: mine_pairs(log, pcfg, item_ids=mf_ids, item_emb=mf_emb)
    )
    out["n_pairs"] = int(len(pairs))
    out["pairs"] = _combine(out, ("retrieval", "mining"))
    if sample_check_pairs:
        from qarm_features.build.pipeline import item_popularity

        popularity, all_pairs = item_popularity(log, ids), pairs
    del log
    acfg = AlignerConfig(max_epochs=max_epochs)
    if aligner_max_pairs is not None and len(pairs) > aligner_max_pairs:
        take = np.random.default_rng(seed).choice(len(pairs), aligner_max_pairs, replace=False)
        pairs = pairs.iloc[np.sort(take)]
    out["aligner_pairs"] = int(len(pairs))
    aligner = stage("aligner", lambda: ItemAligner(acfg).fit(content, ids, pairs))
    out["aligner_epochs_run"] = int(aligner.history_["epochs_run"])

    def codes():  # the pipeline's forward: row blocks, float64 temporaries of one block
        aligned = align_catalog(aligner.weights_, content)
        rq, vq = fit_quantizers(aligned, ids, cfg.rq, cfg.vq)
        rq_codes = rq.encode(aligned)
        vq_codes = vq.encode(aligned, exclude_ids=ids)
        return vq, rq_codes.shape, vq_codes.shape

    vq, _, _ = stage("codes", codes)
    out["vq_mode"] = vq.mode_
    out["vq_ann_recall"] = vq.ann_recall_
    out["vq_nprobe"] = vq.nprobe_  # after VQConfig.ann_min_recall
    out["total"] = _combine(out, ("pairs", "aligner", "codes"))
    if sample_check_pairs:
        del vq
        out["aligner_sample_check"] = aligner_sample_check(
            content, ids, all_pairs, popularity, (aligner_max_pairs, sample_check_pairs),
            max_epochs=max_epochs, seed=seed)
    del content
    tmp.cleanup()
    return out


def aligner_sample_check(content, ids, pairs, popularity, sizes, *, max_epochs: int = 3,
                         seed: int = 0, test_pairs: int = 50_000) -> dict:
    """Does the aligner's pair sample cost quality? One seeded permutation of the mined
    pairs: the first ``test_pairs`` are held out, then nested training samples of each of
    ``sizes`` (the smaller a prefix of the larger). Per size: held-out pair-AUC and
    recall@10 in the aligned space (``pipeline.space_metrics``, 20k AUC pairs, a 2e9
    recall budget), the RQ codes' quality (``pipeline.code_report``: utilisation, entropy,
    collisions, reconstruction error), epochs run and seconds. The raw content space's
    held-out metrics are the floor."""
    from qarm_features.align.aligner import ItemAligner
    from qarm_features.build.pipeline import align_catalog, code_report, space_metrics
    from qarm_features.codes.rq import ResidualQuantizer
    from qarm_features.config import AlignerConfig, BuildConfig

    perm = np.random.default_rng(seed + 1).permutation(len(pairs))
    test = pairs.iloc[np.sort(perm[:test_pairs])]
    rest = perm[test_pairs:]
    metric = {"seed": seed, "max_pairs": 20_000, "recall_budget": 2_000_000_000}
    from qarm_features._validate import l2_normalize

    raw = np.concatenate([l2_normalize(np.asarray(content[i : i + 65_536], np.float32))
                          for i in range(0, len(ids), 65_536)])
    out = {"n_test_pairs": len(test), "raw": space_metrics(raw, ids, test, popularity, **metric)}
    del raw
    for n in sizes:
        train = pairs.iloc[np.sort(rest[: int(n)])]
        t0, c0 = time.perf_counter(), time.process_time()
        aligner = ItemAligner(AlignerConfig(max_epochs=max_epochs)).fit(content, ids, train)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        aligned = align_catalog(aligner.weights_, content)
        rq = ResidualQuantizer.from_config(BuildConfig().rq).fit(aligned)
        out[str(len(train))] = {
            "train_pairs": len(train), "seconds": seconds, "cpu_seconds": cpu,
            "epochs_run": int(aligner.history_["epochs_run"]),
            "heldout": space_metrics(aligned, ids, test, popularity, **metric),
            "codes": code_report(rq, aligned),
        }
        del aligned, aligner
    return out


def _combine(out: dict, names) -> dict:
    return {
        "seconds": sum(out[s]["seconds"] for s in names),
        "cpu_seconds": sum(out[s]["cpu_seconds"] for s in names),
        "peak_rss_mib": max(out[s]["peak_rss_mib"] for s in names),
        "peak_anon_mib": max(out[s].get("peak_anon_mib", float("nan")) for s in names),
    }


def reproduce(n_items: int, n_users: int, max_epochs: int = 3, n_threads: int = 2) -> dict:
    """Child: the issue's measurement, ``build_bundle`` on :class:`SyntheticWorld`."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n_threads)
    threadpool_limits(n_threads)
    from qarm_features.build.bundles import build_bundle
    from qarm_features.config import AlignerConfig, BuildConfig
    from qarm_features.datasets.synthetic import SyntheticWorld

    world = SyntheticWorld(n_items, n_users, content_dim=384, seed=0)
    log = world.interactions(20)
    cfg = BuildConfig(aligner=AlignerConfig(max_epochs=max_epochs))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        res = build_bundle(Path(tmp) / "b", item_ids=world.item_ids, raw_emb=world.content,
                           interactions=log, config=cfg)
    return {"n_items": n_items, "n_events": int(len(log)), "build_s": time.perf_counter() - t0,
            **{k: float(v) for k, v in res.timings.items()}}


# ------------------------------------------------------------------ parent side
def _fit(records: list[dict], stage: str, key: str) -> dict:
    """Least-squares ``seconds = a + b * x`` over the runs; ``b`` in microseconds."""
    x = np.array([r[key] for r in records if stage in r], float)
    y = np.array([r[stage]["seconds"] for r in records if stage in r], float)
    if x.size < 2:
        return {}
    b, a = np.polyfit(x, y, 1)
    pred = a + b * x
    r2 = 1.0 - ((y - pred) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-12)
    return {"per": key, "us_per_unit": b * 1e6, "intercept_s": a, "r2": r2}


def _commit() -> str | None:
    """The checkout's commit (each record says which code it measured), or None."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run(quick: bool, *, runs=None, out_path: str | os.PathLike | None = None,
        sample_check_pairs: int | None = None) -> dict:
    """Run the sweep (each size in its own child); returns and writes the records.
    ``sample_check_pairs``: each child also runs :func:`aligner_sample_check`."""
    from benchmarks.timing import run_child

    env = os.environ.get("QARM_SCALE_RUNS")
    if runs is None and env:
        runs = [tuple(int(v) for v in s.split(":")) for s in env.split(",") if s]
    runs = runs or (QUICK_RUNS if quick else DEFAULT_RUNS)
    records = []
    for n_items, n_events in runs:
        t0 = time.perf_counter()
        try:
            # an hour per 20M events (the 1M / 20M point takes ~15-25 min here)
            limit = max(3600, 3600 * n_events / 20_000_000)
            kw = {"n_items": int(n_items), "n_events": int(n_events)}
            if sample_check_pairs:
                kw["sample_check_pairs"] = int(sample_check_pairs)
            rec = run_child("benchmarks.bench_scale:stages", kw, timeout=limit)
        except Exception as exc:  # noqa: BLE001 - record and go on with the next size
            rec = {"n_items": n_items, "n_events": n_events, "error": str(exc)[-500:]}
        rec["wall_s"] = time.perf_counter() - t0
        rec["commit"] = _commit()
        check = rec.pop("aligner_sample_check", None)
        if check is not None and out_path:  # its own section: a later sweep keeps it
            from benchmarks.timing import merge_results

            merge_results(out_path, {"aligner_sample_check": {
                "n_items": n_items, "n_events": n_events, "commit": rec["commit"],
                "max_epochs": rec.get("max_epochs"), **check}})
        records.append(rec)
        if out_path:
            _write(out_path, records)
    return _summary(records)


def _summary(records: list[dict]) -> dict:
    """Records and the per-stage fits. A record with ``not_in_fit`` (why: e.g. it ran an
    older mining kernel) is kept and shown, but the lines are fitted without it."""
    ok = [r for r in records if "error" not in r]
    same = [r for r in ok if not r.get("not_in_fit")]
    fits = {s: _fit(same, s, "n_events") for s in ("retrieval", "mining", "pairs")}
    fits.update({s: _fit(same, s, "n_items") for s in ("aligner", "codes")})
    for r in ok:
        r["pairs_events_per_s"] = r["n_events"] / r["pairs"]["seconds"]
    return {"records": records, "fits": fits}


STAGES = ("retrieval", "mining", "pairs", "aligner", "codes", "total")


def markdown(summary: dict) -> list[str]:
    """The scaling table: per run and stage, wall seconds / CPU seconds / peak RSS MiB."""
    lines = ["Scaling, one child process per run (wall s / CPU s / peak RSS MiB per stage):", ""]
    lines.append("| items | events | " + " | ".join(STAGES) + " | pairs events/s |")
    lines.append("|---|---|" + "---|" * (len(STAGES) + 1))
    for r in summary["records"]:
        if "error" in r:
            lines.append(f"| {r['n_items']:,} | {r['n_events']:,} | failed: {r['error'][-80:]} |")
            continue
        cells = [f"{r[s]['seconds']:.1f} / {r[s].get('cpu_seconds', float('nan')):.1f} / "
                 f"{r[s]['peak_rss_mib']:.0f}" for s in STAGES]
        lines.append(f"| {r['n_items']:,} | {r['n_events']:,} | " + " | ".join(cells)
                     + f" | {r.get('pairs_events_per_s', float('nan')):,.0f} |")
    lines.append("")
    fits = {k: v for k, v in summary.get("fits", {}).items() if v}
    if fits:
        lines.append("Least-squares fits, wall seconds = a + b x: "
                     + "; ".join(f"{k}: b = {v['us_per_unit']:.2f} us per {v['per'][2:-1]}, "
                                 f"a = {v['intercept_s']:.1f} s, R^2 = {v['r2']:.3f}"
                                 for k, v in fits.items()))
        lines.append("")
    return lines


README_STAGES = (("retrieval", "retrieval (BPR)"), ("mining", "mining (U2I + Swing)"),
                 ("aligner", "aligner"), ("codes", "codes"), ("total", "total"))
README_FITS = (("retrieval", "event", "the retrieval model"), ("mining", "event", "mining"),
               ("aligner", "item", "the aligner"), ("codes", "item", "codes"))


def _count(n: int) -> str:
    """10000 -> ``10k``, 1000000 -> ``1M``, 2500000 -> ``2.5M``."""
    for div, unit in ((1_000_000, "M"), (1_000, "k")):
        if n >= div:
            return f"{n / div:g}{unit}"
    return str(n)


def _secs(s: float) -> str:
    return f"{s:.1f}" if s < 10 else f"{s:,.0f}"


def _cell(st: dict) -> str:
    """``wall s / peak RSS MiB``, then ``(peak anonymous MiB)`` where the run measured it."""
    out = f"{_secs(st['seconds'])} / {st['peak_rss_mib']:,.0f}"
    anon = st.get("peak_anon_mib")
    return out if anon is None or np.isnan(anon) else out + f" ({anon:,.0f})"


def readme_table(summary: dict) -> list[str]:
    """The README's scaling table and its fitted-line sentence, rendered from
    ``scale.json`` (``summary``: its ``records`` and ``fits``): wall s / peak RSS MiB
    (peak anonymous MiB) per stage, pair events/s (retrieval + mining). ``tests/unit/test_scale_table.py`` checks
    that the README holds exactly these lines."""
    lines = ["| items | events | " + " | ".join(t for _, t in README_STAGES) + " | pair events/s |",
             "|---|---|" + "---|" * (len(README_STAGES) + 1)]
    notes = []
    for r in sorted(summary["records"], key=lambda r: (r["n_events"], r["n_items"])):
        mark = "*" * (len(notes) + 1) if r.get("not_in_fit") else ""
        if mark:
            notes.append(f"\\{mark} {_count(r['n_items'])} / {_count(r['n_events'])}: "
                         f"{r['not_in_fit']}")
        head = f"| {_count(r['n_items'])}{mark} | {_count(r['n_events'])} |"
        if "error" in r:
            lines.append(head + " failed |" + " |" * len(README_STAGES))
            continue
        cells = [_cell(r[s]) for s, _ in README_STAGES]
        rate = r["n_events"] / r["pairs"]["seconds"]
        lines.append(head + " " + " | ".join(cells) + f" | {rate / 1000:.0f}k |")
    if notes:
        lines += [""] + [line for n in notes for line in (n, "")][:-1]
    fits = summary.get("fits", {})
    if all(fits.get(s) for s, _, _ in README_FITS):
        r2 = np.floor(min(fits[s]["r2"] for s, _, _ in README_FITS) * 100) / 100
        parts = [f"{fits[s]['us_per_unit']:.3g} us per {unit} for {what}"
                 for s, unit, what in README_FITS]
        lines += ["", f"Fitted (least squares, R^2 >= {r2:.2f}): " + ", ".join(parts[:-1])
                  + f", {parts[-1]}."]
    return lines


def write_readme_table(readme="README.md", results="benchmarks/results/scale.json") -> None:
    """Regenerate the README's scaling table and fitted line from ``results`` in place
    (``python -c "from benchmarks.bench_scale import write_readme_table as w; w()"``)."""
    rendered = readme_table(json.loads(Path(results).read_text()))
    lines = Path(readme).read_text().splitlines(keepends=False)
    i = lines.index(rendered[0])
    j = next(k for k in range(i, len(lines)) if lines[k].startswith("Fitted (least squares"))
    lines[i : j + 1] = rendered
    Path(readme).write_text("\n".join(lines) + "\n")


def _write(path, records) -> None:
    """Merge the sweep's ``records`` into the file's: a run replaces the record of its
    ``(n_items, n_events)``, other sizes are kept (a 1M-only run leaves the smaller points);
    ``fits`` are refitted over all of them. Other sections of the file (bench_stream's
    ``stream``, ``feast_materialize``) are kept."""
    from benchmarks.timing import merge_results

    path = Path(path)
    old = json.loads(path.read_text()).get("records", []) if path.exists() else []
    new = {(r["n_items"], r["n_events"]) for r in records}
    merged = [r for r in old if (r["n_items"], r["n_events"]) not in new] + list(records)
    merged.sort(key=lambda r: (r["n_events"], r["n_items"]))
    merge_results(path, _summary(merged))


# ``python -c`` child of :func:`mining_vs`: argv ``mode root world [n_items n_events]``.
# It imports qarm_features from ``root`` (a checkout) and runs from a scratch directory.
_MINING_CHILD = r"""
import hashlib, json, os, sys, time
mode, root, world = sys.argv[1:4]
sys.path.insert(0, root)
import numpy as np, pandas as pd
from threadpoolctl import threadpool_limits
threadpool_limits(1)
import qarm_features
assert qarm_features.__file__.startswith(root), qarm_features.__file__
from qarm_features.config import PairsConfig
if mode == "prep":
    sys.path.insert(0, sys.argv[6])
    from benchmarks.bench_scale import scale_world
    from qarm_features.pairs.retrieval import BPRMF
    _, _, log = scale_world(int(sys.argv[4]), int(sys.argv[5]), content_dim=8)
    log.to_parquet(os.path.join(world, "log.parquet"))
    ids, emb = BPRMF.from_config(PairsConfig()).fit(log).item_embeddings()
    np.save(os.path.join(world, "ids.npy"), ids)
    np.save(os.path.join(world, "emb.npy"), emb)
    print(json.dumps({}))
else:
    from qarm_features.pairs.mining import mine_pairs
    log = pd.read_parquet(os.path.join(world, "log.parquet"))
    ids, emb = np.load(os.path.join(world, "ids.npy")), np.load(os.path.join(world, "emb.npy"))
    c0 = time.process_time()
    pairs, stats = mine_pairs(log, PairsConfig(), item_ids=ids, item_emb=emb)
    cpu = time.process_time() - c0
    h = hashlib.sha256(str(pairs.dtypes.tolist()).encode())
    for c in ("trigger_id", "target_id", "score"):
        h.update(np.ascontiguousarray(pairs[c].to_numpy()).tobytes())
    h.update("\n".join(pairs["source"]).encode())
    print(json.dumps({"cpu_s": cpu, "n_pairs": len(pairs), "pairs_sha256": h.hexdigest(),
                      "stats": json.dumps(stats, sort_keys=True, default=float)}))
"""


def mining_vs(ref: str = "main", runs=((50_000, 1_000_000), (200_000, 4_000_000)),
              rounds: int = 3) -> dict:
    """``mine_pairs`` CPU seconds of this checkout against git ``ref``'s, interleaved.

    Per size: one log (:func:`scale_world`; mining reads no content, so 8-d) and one BPR
    fit of this checkout (the embeddings both miners are given), then ``rounds`` rounds
    of one child per side, alternating which goes first; each child pins BLAS/OpenMP to
    one thread and reports ``time.process_time()`` of ``mine_pairs`` alone, the SHA-256
    of the pairs frame and the stats. Returns per size the medians, ``ratio`` (ref's CPU
    seconds over ours) and whether the pairs and stats were equal in every round.
    """
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1", PYTHONPATH="")
    with tempfile.TemporaryDirectory(prefix="qarm-mining-vs-") as tmp:
        base = os.path.join(tmp, "ref")
        os.makedirs(base)
        tar = subprocess.run(["git", "-C", str(repo), "archive", ref, "qarm_features"],
                             check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", base], input=tar, check=True)

        def child(*args) -> dict:
            res = subprocess.run([sys.executable, "-c", _MINING_CHILD, *map(str, args)],
                                 cwd=tmp, env=env, check=True, capture_output=True, text=True)
            return json.loads(res.stdout.strip().splitlines()[-1])

        sides = {ref: base, "ours": str(repo)}
        out = {"ref": ref, "rounds": rounds, "runs": []}
        for n_items, n_events in runs:
            world = os.path.join(tmp, f"{n_items}_{n_events}")
            os.makedirs(world)
            child("prep", repo, world, n_items, n_events, repo)
            got: dict = {name: [] for name in sides}
            for r in range(rounds):
                for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                    got[name].append(child("mine", sides[name], world))
            rec = {"n_items": n_items, "n_events": n_events}
            for name, rs in got.items():
                rec[f"{name}_cpu_s"] = [round(x["cpu_s"], 3) for x in rs]
            med = {name: float(np.median([x["cpu_s"] for x in rs])) for name, rs in got.items()}
            rec["ratio"] = med[ref] / med["ours"]
            every = [x for rs in got.values() for x in rs]
            rec["pairs_equal"] = len({x["pairs_sha256"] for x in every}) == 1
            rec["stats_equal"] = len({x["stats"] for x in every}) == 1
            rec["n_pairs"] = every[0]["n_pairs"]
            rec["pairs_sha256"] = sorted({x["pairs_sha256"] for x in every})
            out["runs"].append(rec)
            print(json.dumps(rec), flush=True)
    return out


if __name__ == "__main__":
    # python -m benchmarks.bench_scale [--mining-vs REF | --sample-check N] [items:events ...]
    import sys

    args = sys.argv[1:]
    ref = check = None
    if args[:1] == ["--mining-vs"]:  # mine_pairs CPU seconds, this checkout vs git REF
        ref, args = args[1], args[2:]
    elif args[:1] == ["--sample-check"]:  # + the aligner on N pairs vs ALIGNER_MAX_PAIRS
        check, args = int(args[1]), args[2:]
    sizes = [tuple(int(v) for v in a.split(":")) for a in args] or None
    if ref is not None:
        res = mining_vs(ref, runs=sizes or ((50_000, 1_000_000), (200_000, 4_000_000)))
        Path("benchmarks/results/mining_vs.json").write_text(json.dumps(res, indent=1) + "\n")
    else:
        res = run(False, runs=sizes, out_path="benchmarks/results/scale.json",
                  sample_check_pairs=check)
    print(json.dumps(res, indent=1, default=float))

"""The evaluation report: ``movielens-100k.{json,md,png}``, written atomically.

Renders the results tree of :func:`qarm_features.app.evaluate.run_protocol` (plain dicts
of ``{"mean", "std", "n"}`` leaves) as JSON, a markdown report and a bar plot (AUC by
variant, warm vs cold items), plus the development notes kept in
``development_notes.md`` next to this module (:func:`development_notes`). numpy and
matplotlib only; nothing here trains or reads data.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

REPORT_NAME = "movielens-100k"
COMMAND = "qarm evaluate"
SUBSETS = ("all", "warm", "cold")
METRICS = ("auc", "uauc", "gauc")
NOTES_FILE = Path(__file__).with_name("development_notes.md")


def development_notes(path: Path = NOTES_FILE) -> list[str]:
    """The notes of ``development_notes.md``: one string per ``- `` paragraph (its indented
    continuation lines joined with single spaces); the file's preamble is skipped."""
    notes: list[str] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("- "):
            notes.append(line[2:].strip())
        elif notes and line.startswith("  ") and line.strip():
            notes[-1] += " " + line.strip()
    return notes


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


def _fmt(ms: dict, digits: int = 4) -> str:
    if ms is None or ms.get("mean") is None or not np.isfinite(ms["mean"]):
        return "n/a"
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def _plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = out["results"]
    variants = list(r)
    x = np.arange(len(variants))
    fig, ax = plt.subplots(figsize=(9, 4))
    for j, (subset, color) in enumerate((("warm", "#4C72B0"), ("cold", "#DD8452"))):
        means = [r[v][subset]["auc"]["mean"] for v in variants]
        stds = [r[v][subset]["auc"]["std"] for v in variants]
        ax.bar(
            x + (j - 0.5) * 0.38,
            means,
            0.38,
            yerr=stds,
            capsize=3,
            color=color,
            label=f"{subset} items",
        )
    lo = min(min(r[v][s]["auc"]["mean"] for v in variants) for s in ("warm", "cold"))
    hi = max(max(r[v][s]["auc"]["mean"] for v in variants) for s in ("warm", "cold"))
    ax.set_ylim(max(0.0, lo - 0.03), min(1.0, hi + 0.02))
    ax.set_xticks(x, variants)
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.set_title(f"MovieLens-100k: AUC by variant, warm vs cold items ({len(out['seeds'])} seeds)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    _atomic_write(path, buf.getvalue())


def render_markdown(out: dict) -> str:
    """The human report: headline table, deltas, aims, alignment, code quality, setup."""
    r, cfg = out["results"], out["config"]
    seeds = out["seeds"]
    lines = [
        "# QARM on MovieLens-100k: ranking evaluation",
        "",
        (
            f"Regenerate with `{COMMAND}` (writes `{REPORT_NAME}.md`, `{REPORT_NAME}.json`, "
            f"`{REPORT_NAME}.png`). Seeds {seeds}; total runtime "
            f"{out['seconds']['total'] / 60:.1f} min on this machine "
            f"({cfg['threads']} torch thread(s))."
        ),
        "",
        "## Headline: AUC / UAUC / GAUC, mean ± std over seeds",
        "",
    ]
    c = out["counts"]
    lines.append(
        f"Test rows: all {c['all']['mean']:.0f}, warm items {c['warm']['mean']:.0f}, cold items "
        f"{c['cold']['mean']:.0f} (mean over seeds; the remaining rows are items that first "
        "appear after the split, in *all* only)."
        + (
            f" {c['new_user_rows']['mean'] / c['all']['mean']:.0%} of test rows come from users "
            "with no ranker-training row: for them the user id is untrained and the history "
            "personalises."
            if "new_user_rows" in c
            else ""
        )
    )
    lines.append("")
    for subset in SUBSETS:
        lines += [
            f"**{subset} rows**",
            "",
            "| variant | inputs | AUC | UAUC | GAUC | ΔAUC vs A (paired) |",
            "|---|---|---|---|---|---|",
        ]
        for v in r:
            d = out["deltas_vs_A"][v][subset]["auc"]
            lines.append(
                f"| {v} | {out.get('variants', {}).get(v, '')} | {_fmt(r[v][subset]['auc'])} | "
                f"{_fmt(r[v][subset]['uauc'])} | {_fmt(r[v][subset]['gauc'])} | "
                f"{_fmt(d) if v != 'A' else '—'} |"
            )
        lines.append("")
    lines += [f"![AUC by variant, warm vs cold]({REPORT_NAME}.png)", "", "## Aims", ""]
    a = out["aims"]
    if "warm_D_minus_A_auc" in a:
        ok = "**met**" if a["warm_D_beats_A_by_0.003"] else "**not met**"
        lines.append(
            f"- D beats A by ≥ 0.003 AUC on warm items: {ok} "
            f"(D − A = {a['warm_D_minus_A_auc']:+.4f})."
        )
    if "cold_D_minus_best_raw_auc" in a:
        ok = "**met**" if a["cold_D_at_least_best_raw"] else "**not met**"
        lines.append(
            f"- D at least as good as the best raw-content variant on cold items: {ok} "
            f"(best raw = {a['cold_best_raw_variant']}; D − {a['cold_best_raw_variant']} = "
            f"{a['cold_D_minus_best_raw_auc']:+.4f})."
        )
    lines += _ablation_lines(out)
    lines += [
        "",
        "## Alignment (no ranker)",
        "",
        (
            "Held-out pairs: mined from the test period with the same miner, minus pairs "
            "also mined from train. *unseen*: the subset touching an item in no train pair "
            "(mostly cold items). Pair-AUC uses popularity-matched negatives."
        ),
        "",
        "| pairs | n | recall@10 raw | recall@10 aligned | pair-AUC raw | pair-AUC aligned |",
        "|---|---|---|---|---|---|",
    ]
    al = out["alignment"]
    for name in ("heldout", "unseen"):
        x = al[name]
        lines.append(
            f"| {name} | {x['n_pairs']['mean']:.0f} | {_fmt(x['raw']['recall@10'])} | "
            f"{_fmt(x['aligned']['recall@10'])} | {_fmt(x['raw']['pair_auc'])} | "
            f"{_fmt(x['aligned']['pair_auc'])} |"
        )
    lines += [
        "",
        "## Code quality (RQ, fitted on warm items, measured on them)",
        "",
        (
            "| space | utilization per level | entropy per level | collision rate | "
            "reconstruction error |"
        ),
        "|---|---|---|---|---|",
    ]
    for space in ("raw", "aligned"):
        q = out["codes"][space]
        util = (
            ", ".join(f"{u['mean']:.2f}" for u in q["utilization"])
            if isinstance(q["utilization"], list)
            else _fmt(q["utilization"], 2)
        )
        ent = (
            ", ".join(f"{u['mean']:.2f}" for u in q["entropy"])
            if isinstance(q["entropy"], list)
            else _fmt(q["entropy"], 2)
        )
        lines.append(
            f"| {space} | {util} | {ent} | {_fmt(q['collision_rate'], 3)} | "
            f"{_fmt(q['reconstruction_error'], 3)} |"
        )
    if out.get("notes"):
        lines += [
            "",
            "## Notes from development (same protocol; not regenerated by this command)",
            "",
        ]
        lines += [f"- {n}" for n in out["notes"]]
    lines += ["", "## Setup", ""] + _setup_lines(out)
    return "\n".join(lines) + "\n"


def _ablation_lines(out: dict) -> list[str]:
    abl = out.get("ablations") or {}
    if not abl:
        return []
    r = out["results"]
    lines = [
        "",
        "## Ablations (same seeds, splits and budget; regenerated with this report)",
        "",
        (
            "| ablation | what changes | variant | warm AUC | cold AUC | Δ warm vs main | "
            "Δ cold vs main (paired) | unseen pair-AUC |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, ab in abl.items():
        al = ab.get("alignment")
        pa = _fmt(al["unseen"]["aligned"]["pair_auc"]) if al else "same as main"
        for v, res in ab["results"].items():
            d = ab["delta_vs_main"][v]
            lines.append(
                f"| {name} | {ab['description']} | {v} | {_fmt(res['warm']['auc'])} | "
                f"{_fmt(res['cold']['auc'])} | {_fmt(d['warm']['auc'])} | "
                f"{_fmt(d['cold']['auc'])} | {pa} |"
            )
    main_pa = _fmt(out["alignment"]["unseen"]["aligned"]["pair_auc"])
    lines += [
        "",
        f"Main run for reference: D warm {_fmt(r['D']['warm']['auc'])}, cold "
        f"{_fmt(r['D']['cold']['auc'])}, unseen pair-AUC {main_pa}."
        if "D" in r
        else "",
    ]
    return lines


def _setup_lines(out: dict) -> list[str]:
    cfg = out["config"]
    rk = out["rankers"]
    return [
        (
            f"- Label rating ≥ {cfg['positive_threshold']}; global temporal split at the "
            f"{1 - cfg['test_fraction']:.0%} timestamp quantile; {cfg['cold_item_fraction']:.0%} "
            "of catalog items (random per seed) lose all train rows. Pairs, aligner, codebooks, "
            "VQ pool and rankers see train rows only."
        ),
        (
            f"- History: the user's latest {cfg['history_len']} events strictly before each row, "
            "with their past labels (point in time). Train rows see train events only; test "
            "rows see every earlier event (cold items enter through their content codes)."
        ),
        (
            f"- RQ codes enter the ranker as `{cfg.get('rq_mode', 'both')}` ids "
            "(`prefix`: (c1), (c1, c2), (c1, c2, c3); `level`: (c1), (c2), (c3); `both`), one "
            "table with per-level offsets; VQ codes as a rank-weighted mean of pool-item "
            "embeddings; code tables start at zero."
        ),
        (
            f"- Ranker (every variant): DIN-style, user id + item id + the variant's item-tower "
            f"inputs, part width {cfg['dim']}, target attention over the history, MLP; Adam lr "
            f"{cfg['lr']}, batch {cfg['batch_size']}, ≤ {cfg['epochs']} epochs, best epoch on the "
            f"last {cfg['val_fraction']:.0%} of train rows (patience {cfg['patience']}). "
            "Items without train rows use the zero out-of-vocabulary id embedding."
        ),
        (
            "- Raw codes (C): RQ on a PCA of the L2-normalised MiniLM space to the aligned width "
            f"({cfg['aligner']['out_dim']}), re-normalised; VQ on the full raw space. Same L × K "
            f"({cfg['rq']['n_levels']} × {cfg['rq']['n_codes']}) and top-{cfg['vq']['k']} as QARM."
        ),
        (
            f"- Aligner: {json.dumps(cfg['aligner'])}; pairs: {json.dumps(cfg['pairs'])}; "
            f"early stopping on pairs of {cfg['aligner']['val_fraction']:.0%} of paired items "
            "held out of training."
        ),
        "- Best epochs per seed: " + "; ".join(f"{v} {i['best_epoch']}" for v, i in rk.items()),
        "- Parameters: " + ", ".join(f"{v} {i['n_params']:,}" for v, i in rk.items()),
        (
            "- AUC via scikit-learn; UAUC = mean per-user AUC over users with both labels; GAUC "
            "= the same weighted by the user's test rows. Std is the sample std over seeds."
        ),
    ]


def write_report(out: dict, out_dir: str | Path = "reports") -> dict[str, Path]:
    """Write ``movielens-100k.{json,md,png}`` atomically into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{REPORT_NAME}.{ext}" for ext in ("json", "md", "png")}
    payload = {"dataset": "movielens-100k", "command": COMMAND, **out}
    _atomic_write(paths["json"], (json.dumps(_jsonable(payload), indent=1) + "\n").encode())
    _plot(out, paths["png"])
    _atomic_write(paths["md"], render_markdown(out).encode())
    return paths

"""The evaluation report: ``<name>.{json,md,png}``, written atomically.

Renders the results tree of :func:`qarm_features.app.evaluate.run_protocol` (plain dicts
of ``{"mean", "std", "n"}`` leaves; paired differences with ``ci``) as JSON, a markdown
report and a bar plot (AUC by variant, warm / cold / new items). numpy and matplotlib
only; nothing here trains or reads data. The history of the MovieLens-100k protocol (the
sweeps behind the defaults) is ``docs/evaluation-history.md`` in the source repository.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

REPORT_NAME = "movielens-100k"  # the demo repo's report (feature_repo/qarm.yaml's dataset)
COMMAND = "qarm evaluate"
SUBSETS = ("all", "warm", "cold", "new")
METRICS = ("auc", "uauc", "gauc")
HISTORY = "docs/evaluation-history.md"  # the MovieLens protocol's history (source checkout)
SUBSET_TEXT = {
    "all": "every test row",
    "warm": "items with train rows",
    "cold": "items whose train rows were removed (per seed)",
    "new": "items first seen in the test period",
}


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


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fmt(ms: dict, digits: int = 4) -> str:
    if ms is None or ms.get("mean") is None or not np.isfinite(ms["mean"]):
        return "n/a"
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def _fmt_ci(ms: dict | None, digits: int = 4) -> str:
    """A paired difference: ``+0.0123 [+0.0040, +0.0206]`` (its 95% interval)."""
    if ms is None or ms.get("mean") is None or not np.isfinite(ms["mean"]):
        return "n/a"
    ci = ms.get("ci")
    tail = f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]" if ci else ""
    return f"{ms['mean']:+.{digits}f}{tail}"


def _plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = out["results"]
    variants = list(r)
    x = np.arange(len(variants))
    colors = {"warm": "#4C72B0", "cold": "#DD8452", "new": "#55A868"}
    shown = [
        s for s in colors if all(np.isfinite(r[v][s]["auc"]["mean"] or np.nan) for v in variants)
    ]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(len(shown), 1)
    for j, subset in enumerate(shown):
        means = [r[v][subset]["auc"]["mean"] for v in variants]
        stds = [r[v][subset]["auc"]["std"] for v in variants]
        ax.bar(
            x + (j - (len(shown) - 1) / 2) * width,
            means,
            width,
            yerr=stds,
            capsize=3,
            color=colors[subset],
            label=f"{subset} items",
        )
    if shown:
        lo = min(min(r[v][s]["auc"]["mean"] for v in variants) for s in shown)
        hi = max(max(r[v][s]["auc"]["mean"] for v in variants) for s in shown)
        ax.set_ylim(max(0.0, lo - 0.03), min(1.0, hi + 0.02))
    ax.set_xticks(x, variants)
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    name = (out.get("data") or {}).get("name", REPORT_NAME)
    ax.set_title(f"{name}: AUC by variant and item kind ({len(out['seeds'])} seeds)")
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
    name = (out.get("data") or {}).get("name", REPORT_NAME)
    command = out.get("command", COMMAND)
    lines = [
        f"# QARM on {name}: does it lift the ranker?",
        "",
        (
            f"Regenerate with `{command}` (writes `{name}.md`, `{name}.json`, "
            f"`{name}.png`). Seeds {seeds}; total runtime "
            f"{out['seconds']['total'] / 60:.1f} min on this machine "
            f"({cfg['threads']} torch thread(s))."
        ),
        "",
    ]
    lines += _data_lines(out)
    lines += [
        "## Headline: AUC / UAUC / GAUC, mean ± std over seeds",
        "",
        (
            "Δ vs A: paired differences (same seed, same test rows) with their 95% interval "
            "in brackets: the t-interval over seeds, or with one seed a bootstrap over test "
            "users (`ci_method` in the JSON)."
        ),
        "",
    ]
    c = out["counts"]
    lines.append(
        f"Test rows: all {c['all']['mean']:.0f}, warm items {c['warm']['mean']:.0f}, cold items "
        f"{c['cold']['mean']:.0f}, new items {c.get('new', {}).get('mean', 0):.0f} (mean over "
        "seeds)."
        + (
            f" {c['new_user_rows']['mean'] / c['all']['mean']:.0%} of test rows come from users "
            "with no ranker-training row: for them the user id is untrained and the history "
            "personalises."
            if "new_user_rows" in c
            else ""
        )
    )
    lines.append("")
    lines += _results_lines(r, out.get("paired") or {}, out.get("variants", {}))
    lines += [f"![AUC by variant, warm / cold / new items]({name}.png)", ""]
    lines += _paired_lines(out.get("paired") or {})
    lines += _protocol_lines(out)
    lines += _aims_lines(out.get("aims") or {})
    lines += _other_ranker_lines(out)
    lines += _selection_lines(out)
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
    for pairs in ("heldout", "unseen"):
        x = al[pairs]
        lines.append(
            f"| {pairs} | {x['n_pairs']['mean']:.0f} | {_fmt(x['raw']['recall@10'])} | "
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
    if name == REPORT_NAME:
        lines += [
            "",
            "## History",
            "",
            (
                f"How the defaults were chosen on this data set, sweep by sweep: `{HISTORY}` "
                "in the source repository (not regenerated by this command)."
            ),
        ]
    lines += ["", "## Setup", ""] + _setup_lines(out)
    return "\n".join(lines) + "\n"


# Human names of the paired contrasts (evaluate.CONTRASTS).
CONTRAST_NAMES = {
    "cold_D_minus_B": "cold: D − B",
    "cold_BD_minus_B": "cold: B+D − B",
    "warm_D_minus_A": "warm: D − A",
    "warm_BD_minus_B": "warm: B+D − B",
    "unseen_pair_auc": "alignment: unseen-item pair-AUC",
}


def _data_lines(out: dict) -> list[str]:
    d = out.get("data")
    if not d:
        return []
    label = d["label"]
    return [
        "## Data",
        "",
        (
            f"- Repo `{d['repo']}`: {d['n_items']:,} catalog items ({d['id_kind']} ids), "
            f"{d['n_events']:,} events of {d['n_users']:,} users."
        ),
        f"- Label: {label}",
        f"- Content: {d['content']}",
        "",
    ]


def _results_lines(r: dict, paired: dict, variants: dict) -> list[str]:
    """One table per subset: AUC / UAUC / GAUC per variant and its paired Δ vs A."""
    lines = []
    for subset in SUBSETS:
        lines += [
            f"**{subset} rows** ({SUBSET_TEXT[subset]})",
            "",
            "| variant | inputs | AUC | UAUC | GAUC | ΔAUC vs A [95% CI] | ΔGAUC vs A [95% CI] |",
            "|---|---|---|---|---|---|---|",
        ]
        for v in r:
            d = paired.get(f"{v} - A", {}).get(subset, {})
            lines.append(
                f"| {v} | {variants.get(v, '')} | {_fmt(r[v][subset]['auc'])} | "
                f"{_fmt(r[v][subset]['uauc'])} | {_fmt(r[v][subset]['gauc'])} | "
                f"{_fmt_ci(d.get('auc')) if v != 'A' else '—'} | "
                f"{_fmt_ci(d.get('gauc')) if v != 'A' else '—'} |"
            )
        lines.append("")
    return lines


def _other_ranker_lines(out: dict) -> list[str]:
    """A section per ranker the project did not write (``other_rankers``; absent from
    reports written before issue 17): the headline tables, paired differences and aims."""
    lines = []
    for x in (out.get("other_rankers") or {}).values():
        t = x["training"]
        epochs = ", ".join(f"{v} {t[v]['best_epoch']}" for v in t)
        lines += [
            f"## {x['title']}",
            "",
            (
                "A CTR model from a maintained public library, trained per variant on the "
                "same rows, labels, splits and seeds as our ranker, with the same budget and "
                "early stopping, fed the same features (user id, item id with the same OOV "
                "id for cold and new items, the point-in-time history's item ids, mean "
                "pooled; the variant's dense embedding and RQ / VQ codes). If the lift is "
                "not an artefact of our ranker, it shows here too. Candidates were not "
                f"selected on it. Best epochs per seed: {epochs}."
            ),
            "",
        ]
        lines += _results_lines(x["results"], x.get("paired") or {}, out.get("variants", {}))
        lines += _paired_lines(x.get("paired") or {}, level="###")
        lines += _aims_lines(x.get("aims") or {}, level="###")
    return lines


def _paired_lines(paired: dict, level: str = "##") -> list[str]:
    if not paired:
        return []
    lines = [
        f"{level} Paired differences, warm / cold / new items (95% intervals)",
        "",
        (
            "Each cell: mean of the per-seed differences [95% interval]. An interval that "
            "excludes 0 is a lift (or a loss) these seeds and test users resolve."
        ),
        "",
    ]
    for metric in ("auc", "gauc"):
        lines += [
            f"| {metric.upper()} difference | warm | cold | new | all |",
            "|---|---|---|---|---|",
        ]
        for name, cells in paired.items():
            lines.append(
                f"| {name.replace(' - ', ' − ')} | "
                + " | ".join(_fmt_ci(cells[s].get(metric)) for s in ("warm", "cold", "new", "all"))
                + " |"
            )
        lines.append("")
    return lines


def _protocol_lines(out: dict) -> list[str]:
    sel = out.get("selection") or {}
    sel_seeds = sel.get("seeds", [])
    free = [s for s in out["seeds"] if s not in sel_seeds]
    return [
        "## Protocol: what chose what",
        "",
        (
            "Every choice (the defaults below, each candidate in the table further down) was "
            "made on the **validation split**: the same protocol applied inside each seed's "
            "train rows (last 20% of train rows by time are validation rows; 20% of the "
            "train-visible items, drawn apart from the test cold items, lose their earlier "
            "rows and are the validation cold items). Test rows were read only to write this "
            f"report. Validation seeds that chose: {sel_seeds or 'none'}. "
            f"Seeds that chose nothing at all (neither split): {free or 'none'}; on the test "
            "split no seed chose anything."
        ),
        "",
    ]


def _aims_lines(a: dict, level: str = "##") -> list[str]:
    if not a:
        return []
    lines = [
        f"{level} Aims (test split, paired over seeds: mean ± std of per-seed differences)",
        "",
        (
            "The project's aims for QARM (set on MovieLens-100k; the same bars on any "
            "catalog), with the 95% interval of each difference."
        ),
        "",
        "| aim | measured | target | status |",
        "|---|---|---|---|",
    ]
    for name, x in a.items():
        status = "**met**" if x["met"] else f"**not met** (short by {-x['gap']:.4f})"
        ci = x.get("ci")
        interval = f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else ""
        lines.append(
            f"| {CONTRAST_NAMES.get(name, name)} | {x['mean']:+.4f} ± {x['std']:.4f}{interval} | "
            f"≥ {x['target']:+.3f} | {status} |"
        )
    return lines + [""]


def _selection_lines(out: dict) -> list[str]:
    sel = out.get("selection") or {}
    if not sel:
        return []
    main = sel["main"]
    lines = [
        f"## Candidates (validation split, seeds {sel['seeds']}; regenerated with this report)",
        "",
        (
            "Each row changes the shipped configuration as described and retrains what "
            "changes (item spaces when the aligner or RQ settings change; rankers D and B+D). "
            "Δ vs shipped: paired per-seed differences of validation AUC. The contrasts "
            "columns use the shipped run's A and B. Σ cold Δ: the per-seed sum of D's and B+D's "
            "cold Δ, mean [95% t-interval]. `adopt`: the selection rule (that interval above "
            "0, summed warm Δ ≥ −0.002) says the candidate beats the shipped configuration — "
            "none should, if the shipped default is the validation winner."
        ),
        "",
        (
            "| candidate | what changes | Δ D warm | Δ D cold | Δ B+D warm | Δ B+D cold | "
            "Σ cold Δ | cold D − B | cold B+D − B | unseen pair-AUC | adopt |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mc = main.get("contrasts") or {}
    mal = main.get("alignment")
    main_pa = _fmt(mal["unseen"]["aligned"]["pair_auc"]) if mal else "n/a"
    lines.append(
        f"| **shipped** | the defaults of this report | — | — | — | — | — | "
        f"{_fmt(mc.get('cold_D_minus_B'))} | {_fmt(mc.get('cold_BD_minus_B'))} | {main_pa} | — |"
    )
    for name, c in sel["candidates"].items():
        d = c["delta_vs_main"]
        cell = lambda v, s: _fmt(d[v][s]["auc"]) if v in d else "—"
        cc = c.get("contrasts") or {}
        al = c.get("alignment")
        pa = _fmt(al["unseen"]["aligned"]["pair_auc"]) if al else "same"
        sd = (c.get("summed_delta") or {}).get("cold")
        summed = _fmt_ci(sd) if sd else "n/a"
        lines.append(
            f"| {name} | {c['description']} | {cell('D', 'warm')} | {cell('D', 'cold')} | "
            f"{cell('B+D', 'warm')} | {cell('B+D', 'cold')} | {summed} | "
            f"{_fmt(cc.get('cold_D_minus_B'))} | "
            f"{_fmt(cc.get('cold_BD_minus_B'))} | {pa} | {'yes' if c['adopt'] else 'no'} |"
        )
    lines += [
        "",
        "Validation contrasts of the shipped configuration: "
        + ", ".join(f"{CONTRAST_NAMES[k]} {_fmt(v)}" for k, v in mc.items())
        + ".",
        "",
    ]
    return lines


def _ablation_lines(out: dict) -> list[str]:
    abl = out.get("ablations") or {}
    if not abl:
        return []
    r = out["results"]
    lines = [
        "",
        "## Test-split ablations (same seeds, splits and budget; regenerated with this report)",
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
            f"- Label rating ≥ {cfg['positive_threshold']:g} (the events' label, see Data); "
            f"global temporal split at the {1 - cfg['test_fraction']:.0%} timestamp quantile; "
            f"{cfg['cold_item_fraction']:.0%} of the items with train rows (random per seed) "
            "lose all of them (cold); items first seen after the split are new. Pairs, "
            "aligner, codebooks, VQ pool and rankers see train rows only."
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
            "embeddings; code tables start at zero"
            + (
                "; content-initialised (each code row = a learned map of its decoded RQ "
                "vector / pool item's aligned embedding + a learned delta)."
                if cfg.get("content_codes")
                else "."
            )
        ),
        (
            f"- Ranker (every variant): DIN-style, user id + item id + the variant's item-tower "
            f"inputs, part width {cfg['dim']}, target attention over the history, MLP; Adam lr "
            f"{cfg['lr']}, batch {cfg['batch_size']}, ≤ {cfg['epochs']} epochs, best epoch on the "
            f"last {cfg['val_fraction']:.0%} of train rows (patience {cfg['patience']}). "
            "Items without train rows use the zero out-of-vocabulary id embedding."
        ),
        (
            "- Raw codes (C): RQ on a PCA of the L2-normalised raw space to the aligned width "
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


README_BEGIN = "<!-- qarm evaluate summary: reports/{name}.json -->"
README_END = "<!-- end of the qarm evaluate summary -->"


def readme_summary(out: dict) -> str:
    """The README's evaluation summary, rendered from a report's JSON (a test checks the
    README's copy): test AUC per variant on warm / cold / new items for the main ranker,
    then every ranker's aims, paired over seeds, mean [95% interval]."""
    seeds = out["seeds"]
    minutes = out["seconds"]["total"] / 60
    lines = [
        f"Test AUC of our ranker, mean ± std over seeds {seeds[0]}-{seeds[-1]} "
        f"({len(seeds)} seeds, {minutes:.0f} min on 2 shared cores):",
        "",
        "| variant | inputs | warm items | cold items | new items |",
        "|---|---|---|---|---|",
    ]
    for v, inputs in out["variants"].items():
        cells = " | ".join(_fmt(out["results"][v][s]["auc"]) for s in ("warm", "cold", "new"))
        lines.append(f"| {v} | {inputs} | {cells} |")
    rankers = {"ours (DIN)": out["aims"]}
    for other in (out.get("other_rankers") or {}).values():
        rankers[other["title"]] = other["aims"]
    lines += [
        "",
        "Aims, paired over seeds, mean [95% t-interval]:",
        "",
        "| aim | target | " + " | ".join(rankers) + " |",
        "|---|---|" + "---|" * len(rankers),
    ]
    for name, label in CONTRAST_NAMES.items():
        target = next((a[name]["target"] for a in rankers.values() if name in a), None)
        if target is None:
            continue
        cells = []
        for aims in rankers.values():
            a = aims.get(name)
            cells.append(
                "—" if a is None else f"{_fmt_ci(a)} ({'met' if a['met'] else 'not met'})"
            )
        lines.append(f"| {label} | ≥ {target:+.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(
    out: dict, out_dir: str | Path = "reports", *, name: str = REPORT_NAME
) -> dict[str, Path]:
    """Write ``<name>.{json,md,png}`` atomically into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{name}.{ext}" for ext in ("json", "md", "png")}
    payload = {"dataset": name, "command": COMMAND, **out}
    _atomic_write(paths["json"], (json.dumps(_jsonable(payload), indent=1) + "\n").encode())
    _plot(out, paths["png"])
    _atomic_write(paths["md"], render_markdown(out).encode())
    return paths

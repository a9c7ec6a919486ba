"""Aligner training throughput (pairs/s) next to a bare torch loop of the same model.

Data: the synthetic world's 384-d content for ``n_items`` items; pairs are each item and
its nearest neighbour in the world's ground-truth collaborative space (what pair mining
approximates). Contenders, same epochs, batch size, model and threads, interleaved:

- ``train_aligner``: :class:`qarm_features.align.aligner.ItemAligner` fitted without validation
  (``val_items=[]``), i.e. the training loop with its masked InfoNCE and the
  raw-consistency term (estimated as the defaults say: ``AlignerConfig.raw_consistency_rows``
  rows, one step in ``raw_consistency_every``), plus its set-up (PCA init, index building);
- ``train_aligner (raw_consistency=0)``: the same without the raw-consistency term;
- ``bare torch loop``: :class:`~qarm_features.align.aligner.Aligner` trained with AdamW on plain
  symmetric in-batch InfoNCE (no masking, no extra term, no set-up): the floor;
- ``bare torch loop, same loss``: the same plus the raw-consistency term written plainly
  (centred reference in numpy, dense ``(2B, 2B)`` Gram matrices): the loss the aligner
  trains, without its PCA init, masking and validation hooks.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.timing import env_vars, interleave, ratio, threads


def make_pairs(n_items: int, raw_dim: int = 384, seed: int = 0):
    """``(raw (n, raw_dim), ids (n,), pairs DataFrame)`` from the synthetic world."""
    import faiss
    import pandas as pd

    from qarm_features.datasets.synthetic import SyntheticWorld

    world = SyntheticWorld(n_items=n_items, n_users=1, content_dim=raw_dim, seed=seed)
    raw = np.concatenate([c for _, c in world.iter_content(65_536)])
    collab = np.ascontiguousarray(world.collab, dtype=np.float32)
    index = faiss.IndexFlatL2(collab.shape[1])
    index.add(collab)
    _, nn = index.search(collab, 2)
    ids = np.arange(1, n_items + 1, dtype=np.int64)
    pairs = pd.DataFrame({"trigger_id": ids, "target_id": ids[nn[:, 1]]})
    return raw, ids, pairs[pairs.trigger_id != pairs.target_id].reset_index(drop=True)


def bare_loop(
    raw: np.ndarray, ids: np.ndarray, pairs, cfg, epochs: int, *, same_loss: bool = False
) -> None:
    """The floor: the same module and optimiser, plain symmetric InfoNCE, nothing else.

    ``same_loss``: plus the raw-consistency term as a torch user writes it (the centred
    reference in numpy, then two dense ``(2B, 2B)`` Gram matrices per step). No PCA init,
    no in-batch masking: the aligner's loss without its set-up and safeguards.
    """
    import torch
    import torch.nn.functional as F

    from qarm_features.align.aligner import Aligner

    torch.manual_seed(cfg.seed)
    pos = {int(v): i for i, v in enumerate(ids)}
    a_all = torch.as_tensor([pos[int(v)] for v in pairs["trigger_id"]])
    b_all = torch.as_tensor([pos[int(v)] for v in pairs["target_id"]])
    ref_all = None
    if same_loss:
        x = raw / np.linalg.norm(raw, axis=1, keepdims=True)
        x = x - x.mean(axis=0)
        ref = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        ref_all = torch.from_numpy(ref)
    x_all = torch.from_numpy(raw)
    model = Aligner(raw.shape[1], cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = a_all.numel()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n)
        for s in range(0, n, cfg.batch_size):
            idx = perm[s : s + cfg.batch_size]
            if idx.numel() < 2:
                continue
            za, zb = model(x_all[a_all[idx]]), model(x_all[b_all[idx]])
            logits = za @ zb.T / cfg.temperature
            labels = torch.arange(idx.numel())
            loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
            if ref_all is not None:
                z, r = torch.cat([za, zb]), ref_all[torch.cat([a_all[idx], b_all[idx]])]
                m = z.shape[0]
                gram = ((z @ z.T - r @ r.T) ** 2).sum() / (m * (m - 1))
                loss = loss + cfg.raw_consistency * gram
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def run(quick: bool, n_threads: int = 2, repeats: int = 2) -> dict:
    from qarm_features.align.aligner import ItemAligner
    from qarm_features.config import AlignerConfig

    n_items = 10_000 if quick else 50_000
    epochs = 1 if quick else 2
    raw, ids, pairs = make_pairs(n_items)
    n_pairs = len(pairs)
    cfg = AlignerConfig(max_epochs=epochs)
    cfg0 = AlignerConfig(max_epochs=epochs, raw_consistency=0.0)
    history = {}

    def ours(c, key):
        def run_():
            history[key] = ItemAligner(c).fit(raw, ids, pairs, val_items=[]).history_

        return run_

    fns = {
        "train_aligner": ours(cfg, "full"),
        "train_aligner (raw_consistency=0)": ours(cfg0, "no_raw"),
        "bare torch loop": lambda: bare_loop(raw, ids, pairs, cfg, epochs),
        "bare torch loop, same loss": lambda: bare_loop(
            raw, ids, pairs, cfg, epochs, same_loss=True
        ),
    }
    # Constructing the first torch optimizer imports torch._dynamo (~3 s, once per process):
    # pay it here, or it lands in whichever contender runs first.
    import torch

    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    thread_counts = (1,) if quick else tuple(sorted({1, n_threads}))
    cases = {}
    for name, fn in fns.items():
        for t in thread_counts:

            def run_t(fn=fn, t=t):
                with threads(t), env_vars(QARM_THREADS=str(t)):  # the aligner's own pinning
                    fn()

            cases[f"{name}@{t}t"] = run_t
    stats = interleave(cases, repeats=repeats, warmup=0)
    configs = {name: {"median_s": st.median, "pairs_per_s": epochs * n_pairs / st.median,
                      "times_s": st.times} for name, st in stats.items()}  # fmt: skip
    contenders = {}
    for name in fns:
        best = max((c for c in configs if c.rsplit("@", 1)[0] == name),
                   key=lambda c: configs[c]["pairs_per_s"])  # fmt: skip
        contenders[name] = {"config": best, "pairs_per_s": configs[best]["pairs_per_s"]}
    floor = contenders["bare torch loop"]["pairs_per_s"]
    same = contenders["bare torch loop, same loss"]["pairs_per_s"]
    for row in contenders.values():
        row["ratio_to_bare_loop"] = ratio(row["pairs_per_s"], floor)
        row["ratio_to_bare_loop_same_loss"] = ratio(row["pairs_per_s"], same)
    loop_only = history.get("full", {}).get("pairs_per_s")
    return {
        "n_items": n_items, "n_pairs": n_pairs, "epochs": epochs,
        "batch_size": cfg.batch_size, "hidden": cfg.hidden, "out_dim": cfg.out_dim,
        "configs": configs, "contenders": contenders,
        "train_aligner_loop_pairs_per_s_last": float(loop_only[-1]) if loop_only else None,
    }  # fmt: skip


if __name__ == "__main__":  # pragma: no cover
    t0 = time.perf_counter()
    print(run(quick=True), time.perf_counter() - t0)

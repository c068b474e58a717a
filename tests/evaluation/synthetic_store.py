"""Run stores with synthetic confidences, written through the store's own writer, for worlds whose truth is
known: no membership signal, unlearned models distributed exactly as retrained ones (independent, or
correlated through their original), or a known membership gap.

Confidences: conf = base[e] + gap * trained_on[e] + noise (2 classes, so conf = logit_y - logit_other
exactly).  Unlearned models of a sibling world share a per-(original, example) effect that carries a
fraction ``sibling_share`` of the noise variance, so their marginal distribution equals the retrained one.
"""
from __future__ import annotations

import numpy as np

from farm.store import RunStore, examples_table, logits_table

HASH = "0000beef"  # 8 hex, as every model id's hparams hash (farm.store.MODEL_ID)


def build_store(uri: str, *, n_train: int = 600, n_test: int = 300, n_forget: int = 120, n_shadow: int = 16,
                n_retrain: int = 24, n_unlearned: int = 24, n_originals: int = 24, gap: float = 0.0,
                sibling_share: float = 0.0, unlearned_shift: float = 0.0, noise: float = 1.0, n_q: int = 1,
                seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n_e = n_train + n_test
    split = np.array(["train"] * n_train + ["test"] * n_test)
    labels = rng.integers(0, 2, n_e)
    forget = np.zeros(n_e, bool)
    forget[rng.choice(n_train, n_forget, replace=False)] = True
    manifest = {"format_version": 1, "spec": {"name": "synthetic", "queries": ["plain", "hflip"][:n_q]},
                "identity": "synthetic", "identity_fields": {"seed": seed},
                "dataset": {"name": "synthetic", "fingerprint": "0" * 64,
                            "splits": {"train": n_train, "val": 0, "test": n_test}},
                "n_examples": n_e, "n_classes": 2}
    store = RunStore(uri)
    store.init_run(manifest, examples_table(split, labels, None, forget))
    base = rng.normal(2.0, 1.5, n_e)
    train = split == "train"
    parent_effect = rng.normal(0, 1, (n_originals, n_e, n_q))
    models = []
    for pair in range(n_shadow // 2):
        half = np.zeros(n_e, bool)
        half[rng.permutation(np.flatnonzero(train))[: n_train // 2]] = True
        models += [(f"shadow-{2 * pair:05d}", "shadow", half, None),
                   (f"shadow-{2 * pair + 1:05d}", "shadow", train & ~half, None)]
    retain = train & ~forget
    models += [(f"retrain-{i:05d}", "retrain", retain, None) for i in range(n_retrain)]
    models += [(f"unlearned-nullmethod-{HASH}-{i:05d}", "unlearned", retain, i % n_originals)
               for i in range(n_unlearned)]
    for k, (mid, role, trained, parent) in enumerate(models):
        r = np.random.default_rng([seed, k])
        eps = r.normal(0, 1, (n_e, n_q))
        if parent is not None and sibling_share > 0:
            eps = np.sqrt(sibling_share) * parent_effect[parent] + np.sqrt(1 - sibling_share) * eps
        shift = unlearned_shift * forget if role == "unlearned" else 0.0
        conf = (base + gap * trained + shift)[:, None] + noise * eps
        logits = np.zeros((n_e, n_q, 2), np.float32)
        logits[np.arange(n_e), :, labels] = conf.astype(np.float32)
        table = logits_table(labels, logits, trained if role != "unlearned" else train,
                             forget if role in ("retrain", "unlearned") else np.zeros(n_e, bool), keep_logits=False)
        acc = {"retain": 0.9, "forget": 0.85, "test": 0.85, "train": 0.9, "val": None}
        store.write_model(mid, table, {"role": role, "seed": k,
                                       "parent": f"original-{parent:05d}" if parent is not None else None,
                                       "method": "nullmethod" if role == "unlearned" else None,
                                       "hparams": {"lr": 0.01} if role == "unlearned" else {},
                                       "accuracy": acc, "train_seconds": 1.0, "seconds": 1.0})

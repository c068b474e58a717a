"""U-LiRA style per-example attack on unlearning (Hayes et al. 2024, "Inexact unlearning needs more
careful evaluations to avoid a false sense of privacy").

Question: given a model's confidence on a forget example, can an attacker tell whether the model was
unlearned or retrained from scratch?  Per forget example e and query q, Gaussians are fitted to the
confidences of held-out *reference* unlearned models (mean mu_u, std s_u, ddof 0) and reference
retrained models (mu_r, s_r); a held-out *target* model with confidences x is called "unlearned" when

    LR(x) = mean_q [log N(x_q; mu_u, s_u + 1e-30) - log N(x_q; mu_r, s_r + 1e-30)] > 0,

"retrained" when LR < 0, and half right when LR = 0.  The models of each kind are split into
``folds`` disjoint folds (seeded shuffle); each fold serves once as targets with the other folds as
references; with group labels (e.g. each unlearned model's parent), folds hold whole groups.
Accuracy is balanced: (accuracy on unlearned targets + accuracy on retrained targets) / 2,
averaged over examples; 0.5 means nothing leaks, 1.0 means every model is recognised.
"""
from __future__ import annotations

import numpy as np

__all__ = ["ulira_attack", "ulira_accuracy", "group_folds"]

_GUARD = 1e-30


def _fit(x):
    return x.mean(axis=0), x.std(axis=0) + _GUARD


def _logpdf(x, mu, sd):
    z = (x - mu) / sd
    return -0.5 * z * z - np.log(sd)


def _group_ids(groups, n, name):
    """Labels per model (None: one group per model) -> (group index per model int[n], number of groups)."""
    if groups is None:
        return np.arange(n), n
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups_{name} must have one label per {name} model ({n}), got shape {g.shape}")
    _, ids = np.unique(g, return_inverse=True)
    return ids.reshape(n), int(ids.max()) + 1 if n else 0


def group_folds(rng, ids, n_groups, folds):
    """Shuffle the groups, deal them into ``folds`` folds (np.array_split) -> model indices per fold."""
    fold_of_group = np.empty(n_groups, dtype=np.int64)
    for k, part in enumerate(np.array_split(rng.permutation(n_groups), folds)):
        fold_of_group[part] = k
    return [np.flatnonzero(fold_of_group[ids] == k) for k in range(folds)]


def ulira_attack(unlearned, retrained, *, folds: int = 2, seed: int = 0, groups_unlearned=None,
                 groups_retrained=None) -> dict:
    """U-LiRA attack -> {"accuracy": float, "per_example_accuracy": float64[E],
    "n_groups_unlearned": int, "n_groups_retrained": int}.

    unlearned[N_u, E] or [N_u, E, Q], retrained[N_r, E] or [N_r, E, Q]: confidences on forget examples.
    groups_unlearned / groups_retrained: optional labels (int or str) per model, e.g. the original
    model each unlearned model was derived from; a missing one means one group per model.  The
    distinct groups of each kind are shuffled (seeded) and split into ``folds`` folds as evenly as
    possible (np.array_split), so models of one group are never both target and reference.
    Without groups every model is its own group (the original behaviour) and each kind needs at
    least 2 * folds models; with groups each kind needs at least 2 * folds distinct groups (so every
    fold holds >= 2 groups and every fold's references >= 2 models).
    """
    u = np.asarray(unlearned, dtype=np.float64)
    r = np.asarray(retrained, dtype=np.float64)
    if u.ndim == 2:
        u = u[..., None]
    if r.ndim == 2:
        r = r[..., None]
    if u.ndim != 3 or r.ndim != 3 or u.shape[1:] != r.shape[1:]:
        raise ValueError(f"unlearned and retrained must be [N, E(, Q)] with the same E and Q, "
                         f"got {np.shape(unlearned)} and {np.shape(retrained)}")
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    grouped = groups_unlearned is not None or groups_retrained is not None
    ids = {}
    for name, a, groups in (("unlearned", u, groups_unlearned), ("retrained", r, groups_retrained)):
        if not grouped and a.shape[0] < 2 * folds:
            raise ValueError(f"U-LiRA with {folds} folds needs at least {2 * folds} {name} models, got {a.shape[0]}")
        ids[name] = _group_ids(groups, a.shape[0], name)
        if grouped and ids[name][1] < 2 * folds:
            raise ValueError(f"U-LiRA with {folds} folds needs at least {2 * folds} distinct groups of {name} "
                             f"models (e.g. parents), got {ids[name][1]}")
        if not np.isfinite(a).all():
            raise ValueError(f"{name} has {int((~np.isfinite(a)).sum())} NaN or infinite values")
    rng = np.random.default_rng(seed)
    fu = group_folds(rng, *ids["unlearned"], folds)
    fr = group_folds(rng, *ids["retrained"], folds)
    correct_u = np.zeros(u.shape[1])
    correct_r = np.zeros(u.shape[1])
    for k in range(folds):
        ref_u = np.setdiff1d(np.arange(u.shape[0]), fu[k])
        ref_r = np.setdiff1d(np.arange(r.shape[0]), fr[k])
        mu_u, sd_u = _fit(u[ref_u])
        mu_r, sd_r = _fit(r[ref_r])
        for targets, is_unlearned, acc in ((u[fu[k]], True, correct_u), (r[fr[k]], False, correct_r)):
            lr = (_logpdf(targets, mu_u, sd_u) - _logpdf(targets, mu_r, sd_r)).mean(axis=-1)  # [T, E]
            right = (lr > 0) if is_unlearned else (lr < 0)
            acc += (right + 0.5 * (lr == 0)).sum(axis=0)
    per_example = 0.5 * (correct_u / u.shape[0] + correct_r / r.shape[0])
    return {"accuracy": float(per_example.mean()), "per_example_accuracy": per_example,
            "n_groups_unlearned": ids["unlearned"][1], "n_groups_retrained": ids["retrained"][1]}


def ulira_accuracy(unlearned, retrained, *, folds: int = 2, seed: int = 0) -> float:
    """Balanced accuracy of the U-LiRA attack (see ulira_attack); 0.5 = nothing leaks."""
    return ulira_attack(unlearned, retrained, folds=folds, seed=seed)["accuracy"]

"""The report's utility and cost, from the markers: mean accuracy per split and role, and the unlearning
time of a method's models over the retraining time (with the models over the spec's time cut-off)."""
from __future__ import annotations

import numpy as np

__all__ = ["SPLITS", "accuracies", "accuracy_summary", "cost_section"]

SPLITS = ("retain", "forget", "test", "val", "train")


def accuracies(markers: list[dict], split: str) -> list[float]:
    """The markers' accuracies on ``split``, skipping markers without one."""
    return [float(mk["accuracy"][split]) for mk in markers
            if isinstance(mk.get("accuracy"), dict) and mk["accuracy"].get(split) is not None]


def accuracy_summary(markers: list[dict]) -> dict:
    """split -> {"mean", "std", "n"} over the markers that have an accuracy on it."""
    out = {}
    for split in SPLITS:
        vals = accuracies(markers, split)
        if vals:
            out[split] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals)}
    return out


def _seconds(markers: list[dict]) -> list[float]:
    return [float(mk["train_seconds"]) for mk in markers if mk.get("train_seconds") is not None]


def cost_section(key: str, u_ids: list[str], u_markers: list[dict], r_markers: list[dict]) -> tuple[dict, list[str]]:
    """Mean unlearning time over mean retraining time, and the models over the spec's time cut-off
    -> (section, notes)."""
    su, sr = _seconds(u_markers), _seconds(r_markers)
    if not (su and sr and np.mean(sr) > 0):
        msg = f"{key}: cost needs train_seconds in the markers of unlearned and retrained models"
        return {"message": msg}, [msg]
    cost = {"unlearn_seconds_mean": float(np.mean(su)), "retrain_seconds_mean": float(np.mean(sr)),
            "ratio": float(np.mean(su) / np.mean(sr))}
    # the spec's time_cutoff (a fraction of the mean retraining time; the challenge rejected slower methods)
    cutoff = next((mk["time_cutoff"] for mk in u_markers if mk.get("time_cutoff")), None)
    if cutoff:
        over = [mid for mid, mk in zip(u_ids, u_markers)
                if mk.get("train_seconds") is not None and mk["train_seconds"] / np.mean(sr) > cutoff]
        cost.update(time_cutoff=float(cutoff), over_time_cutoff=over, fraction_over_time_cutoff=len(over) / len(u_ids))
    return cost, []

"""Per-example scores read from model outputs.

``logit_scaled_confidence(logits[..., C], labels) -> float64[...]``:
conf = log(p_y + 1e-45) - log(sum_{k != y} p_k + 1e-45), p = softmax(logits) in float64 after
subtracting the row maximum (as LiRA's and the competition's reference code do).  The farm computes the
stored ``conf`` column with this function, so the column and a recomputation from stored full logits
agree to the last bit.
"""
from __future__ import annotations

import numpy as np

__all__ = ["logit_scaled_confidence"]

_TINY = 1e-45  # added inside both logs, as LiRA's and the competition's reference code do


def logit_scaled_confidence(logits, labels) -> np.ndarray:
    """conf = log(p_y + 1e-45) - log(sum_{k != y} p_k + 1e-45), in float64.

    p = softmax(logits) computed after casting to float64 and subtracting the row maximum.
    ``logits`` has shape [..., C]; ``labels`` holds integer classes and broadcasts against
    ``logits.shape[:-1]`` (e.g. labels[E] with logits[M, E, C] or logits[E, Q, C] with labels[E, 1]).
    Returns float64 of shape ``logits.shape[:-1]``.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim < 1 or z.shape[-1] < 2:
        raise ValueError(f"logits must have a class axis of size >= 2, got shape {z.shape}")
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    n_classes = z.shape[-1]
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}), got range [{labels.min()}, {labels.max()}]")
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    labels = np.broadcast_to(labels, z.shape[:-1])
    is_true = np.arange(n_classes) == labels[..., None]
    p_true = np.where(is_true, p, 0.0).sum(axis=-1)
    p_wrong = np.where(is_true, 0.0, p).sum(axis=-1)
    return np.log(p_true + _TINY) - np.log(p_wrong + _TINY)

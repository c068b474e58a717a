"""Per-example scores read from model outputs.

``logit_scaled_confidence(logits[..., C], labels) -> float64[...]``:
conf = log(p_y + 1e-45) - log(sum_{k != y} p_k + 1e-45), p = softmax(logits) in float64 after
subtracting the row maximum (as LiRA's and the competition's reference code do).  Re-exported from
farm.confidence so the stored ``conf`` column and a recomputation agree to the last bit.
"""
from farm.confidence import logit_scaled_confidence

__all__ = ["logit_scaled_confidence"]

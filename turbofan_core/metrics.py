"""How RUL predictions are scored: RMSE, MAE, the PHM08 challenge score and interval coverage.

The PHM08 score is asymmetric on purpose: predicting failure too late (d > 0) costs more
than predicting it too early, because a late prediction means an engine failing in service.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

# PHM08 challenge constants: errors are scaled by 13 cycles when early, 10 when late.
PHM08_EARLY_SCALE = 13.0
PHM08_LATE_SCALE = 10.0


def _errors(y_true: ArrayLike, y_pred: ArrayLike) -> np.ndarray:
    """d = predicted - true, refusing inputs that would make a metric silently wrong."""
    true = np.asarray(y_true, dtype=np.float64)
    pred = np.asarray(y_pred, dtype=np.float64)
    if true.shape != pred.shape or true.ndim != 1:
        raise ValueError(f"expected two 1-d arrays of one length, got shapes {true.shape} and {pred.shape}")
    if true.size == 0:
        raise ValueError("no predictions to score")
    if not (np.isfinite(true).all() and np.isfinite(pred).all()):
        raise ValueError("true and predicted RUL must be finite")
    return pred - true


def rmse(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    return float(np.sqrt(np.mean(np.square(_errors(y_true, y_pred)))))


def mae(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    return float(np.mean(np.abs(_errors(y_true, y_pred))))


def phm08_terms(y_true: ArrayLike, y_pred: ArrayLike) -> np.ndarray:
    """Each prediction's PHM08 penalty: exp(-d/13) - 1 when early (d < 0), exp(d/10) - 1 when late."""
    d = _errors(y_true, y_pred)
    return np.where(d < 0, np.expm1(-d / PHM08_EARLY_SCALE), np.expm1(d / PHM08_LATE_SCALE))


def phm08_score(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """The PHM08 challenge score: the sum of the penalties, so it grows with the number of engines."""
    return float(phm08_terms(y_true, y_pred).sum())


def interval_coverage(y_true: ArrayLike, lower: ArrayLike, upper: ArrayLike) -> float:
    """Share of true values inside [lower, upper]; a p10-p90 interval should cover about 0.8."""
    true = np.asarray(y_true, dtype=np.float64)
    low = np.asarray(lower, dtype=np.float64)
    high = np.asarray(upper, dtype=np.float64)
    if not (true.shape == low.shape == high.shape) or true.ndim != 1 or true.size == 0:
        raise ValueError(
            f"expected three non-empty 1-d arrays of one length, got {true.shape}, {low.shape}, {high.shape}"
        )
    return float(np.mean((low <= true) & (true <= high)))


def regression_report(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float]:
    """RMSE, MAE and PHM08 in one dict, the shape the registry and the bench report."""
    return {"rmse": rmse(y_true, y_pred), "mae": mae(y_true, y_pred), "phm08": phm08_score(y_true, y_pred)}

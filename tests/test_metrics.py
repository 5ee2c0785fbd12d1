"""RMSE, MAE, the PHM08 score and interval coverage, checked against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from turbofan_core import metrics


def test_rmse_and_mae() -> None:
    true, predicted = [10, 20, 30, 40], [12, 18, 30, 44]  # errors 2, -2, 0, 4
    assert metrics.rmse(true, predicted) == pytest.approx(math.sqrt((4 + 4 + 0 + 16) / 4))
    assert metrics.mae(true, predicted) == pytest.approx(2.0)


def test_phm08_penalises_late_more_than_early() -> None:
    # d = predicted - true: -13 (early) costs e - 1, +10 (late) costs e - 1, 0 costs nothing.
    assert metrics.phm08_score([50], [37]) == pytest.approx(math.e - 1)
    assert metrics.phm08_score([50], [60]) == pytest.approx(math.e - 1)
    assert metrics.phm08_score([50], [50]) == 0.0
    early, late = metrics.phm08_score([50], [40]), metrics.phm08_score([50], [60])
    assert late > early > 0
    # The score is a sum over engines, and each term is the formula of the challenge.
    true, predicted = np.array([10, 50, 90]), np.array([5, 58, 90])
    expected = (math.exp(5 / 13) - 1) + (math.exp(8 / 10) - 1) + 0.0
    assert metrics.phm08_score(true, predicted) == pytest.approx(expected)
    assert metrics.phm08_terms(true, predicted).sum() == pytest.approx(expected)


def test_interval_coverage_counts_bounds_as_inside() -> None:
    true = [10, 20, 30, 40, 50]
    lower = [5, 20, 31, 0, 60]
    upper = [15, 25, 40, 40, 70]
    assert metrics.interval_coverage(true, lower, upper) == pytest.approx(3 / 5)


def test_regression_report_has_the_three_headline_figures() -> None:
    report = metrics.regression_report([1, 2], [1, 2])
    assert report == {"rmse": 0.0, "mae": 0.0, "phm08": 0.0}


@pytest.mark.parametrize(
    ("true", "predicted", "message"),
    [
        ([1, 2], [1], "one length"),
        ([], [], "no predictions"),
        ([1, float("nan")], [1, 2], "finite"),
        ([1, 2], [1, float("inf")], "finite"),
        ([[1, 2]], [[1, 2]], "1-d"),
    ],
)
def test_bad_inputs_are_refused_not_scored(true: list, predicted: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        metrics.rmse(true, predicted)


def test_coverage_refuses_mismatched_bounds() -> None:
    with pytest.raises(ValueError, match="one length"):
        metrics.interval_coverage([1, 2], [0, 0], [3])

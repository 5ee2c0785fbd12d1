"""RUL labels: counted down to the failure event, capped, never given to censored lifetimes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from turbofan_core.labels import DEFAULT_RUL_CAP, label_rul


def _messages(*runs: tuple[str, int, bool]) -> pd.DataFrame:
    """Messages in arrival order: per (device, cycles, failed), cycles 1..n then a failure event if failed."""
    rows = []
    for device, cycles, failed in runs:
        rows += [(device, cycle, False) for cycle in range(1, cycles + 1)]
        if failed:
            rows.append((device, cycles, True))
    return pd.DataFrame(rows, columns=["device_id", "CycleTime", "is_failure"])


def _split(messages: pd.DataFrame, closed: dict[str, int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Telemetry and failure events with lifetimes, for in-order messages: 1 + the device's failure
    events before the message (`closed` of them already recorded). Ingestion's own numbering, by
    device order whatever the arrival order, is tested in test_delivery."""
    failures = messages["is_failure"].astype(int)
    before = failures.groupby(messages["device_id"]).cumsum() - failures
    lifetime = 1 + before + messages["device_id"].map(closed).fillna(0).astype(int)
    messages = messages.assign(lifetime=lifetime)
    return messages[~messages["is_failure"]], messages[messages["is_failure"]]


def test_rul_counts_down_to_the_failure_and_is_held_at_the_cap() -> None:
    telemetry, failures = _split(_messages(("Client_001", 200, True)), {})
    labels = label_rul(telemetry, failures)
    rul = labels.set_index("CycleTime")["rul"]
    assert rul[200] == 0 and rul[199] == 1
    assert rul[75] == DEFAULT_RUL_CAP and rul[76] == 124  # 200 - 76 = 124: below the cap
    assert (rul[rul.index <= 75] == DEFAULT_RUL_CAP).all()
    assert labels["failure_cycle"].unique().tolist() == [200]
    assert labels["rul_cap"].unique().tolist() == [DEFAULT_RUL_CAP]
    short = label_rul(telemetry, failures, cap=50)["rul"]
    assert short.max() == 50 and (short.diff().dropna() <= 0).all()


def test_censored_lifetimes_get_no_labels() -> None:
    telemetry, failures = _split(_messages(("Client_001", 30, True), ("Client_002", 40, False)), {})
    labels = label_rul(telemetry, failures)
    assert set(labels["device_id"]) == {"Client_001"}
    assert len(labels) == 30


def test_an_engine_replaced_after_failure_is_a_new_lifetime() -> None:
    # Client_001's first engine fails at cycle 5; its replacement starts again at cycle 1.
    first_batch = _messages(("Client_001", 5, True), ("Client_001", 3, False))
    telemetry, failures = _split(first_batch, {})
    assert telemetry["lifetime"].tolist() == [1] * 5 + [2] * 3
    assert failures["lifetime"].tolist() == [1]  # the failure event closes lifetime 1
    labels = label_rul(telemetry, failures)
    assert labels["lifetime"].unique().tolist() == [1]  # lifetime 2 is still running: censored
    assert labels["rul"].tolist() == [4, 3, 2, 1, 0]

    # A later batch carries on the numbering from the failures already recorded.
    later = pd.DataFrame(
        {"device_id": ["Client_001"] * 3, "CycleTime": [4, 5, 5], "is_failure": [False, False, True]}
    )
    more_telemetry, more_failures = _split(later, {"Client_001": 1})
    assert more_telemetry["lifetime"].tolist() == [2, 2]
    all_telemetry = pd.concat([telemetry, more_telemetry])
    labels = label_rul(all_telemetry, pd.concat([failures, more_failures]))
    second = labels[labels["lifetime"] == 2]
    assert second["CycleTime"].tolist() == [1, 2, 3, 4, 5]
    assert second["rul"].tolist() == [4, 3, 2, 1, 0]


def test_a_repeated_failure_event_does_not_relabel() -> None:
    telemetry, failures = _split(_messages(("Client_001", 10, True)), {})
    repeated = pd.concat([failures, failures.assign(CycleTime=99)])
    assert label_rul(telemetry, repeated)["failure_cycle"].unique().tolist() == [10]


@pytest.mark.parametrize("cap", [0, -5])
def test_cap_must_be_positive(cap: int) -> None:
    telemetry, failures = _split(_messages(("Client_001", 10, True)), {})
    with pytest.raises(ValueError, match="positive"):
        label_rul(telemetry, failures, cap=cap)


def test_labels_are_integers_sorted_by_trajectory() -> None:
    telemetry, failures = _split(_messages(("Client_002", 4, True), ("Client_001", 3, True)), {})
    labels = label_rul(telemetry.sample(frac=1, random_state=0), failures)
    assert labels["rul"].dtype == np.int64
    assert labels[["device_id", "CycleTime"]].values.tolist() == [
        ["Client_001", 1], ["Client_001", 2], ["Client_001", 3],
        ["Client_002", 1], ["Client_002", 2], ["Client_002", 3], ["Client_002", 4],
    ]  # fmt: skip

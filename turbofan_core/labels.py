"""Engine lifetimes and remaining-useful-life labels.

A device's messages belong to its current engine lifetime; a failure event closes it,
and what the device sends next (CycleTime back at 1) belongs to a new engine (the warehouse
numbers lifetimes in device order: turbofan_warehouse.delivery). Only a
lifetime closed by a failure event has a known end, so only those get RUL labels;
the others are censored: scored, never trained on.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

DEFAULT_RUL_CAP = 125
KEYS = ["device_id", "lifetime"]


def label_rul(telemetry: pd.DataFrame, failures: pd.DataFrame, cap: int = DEFAULT_RUL_CAP) -> pd.DataFrame:
    """RUL for every cycle of every lifetime that ended in a failure event.

    telemetry: device_id, lifetime, CycleTime. failures: device_id, lifetime, CycleTime
    (the last cycle). RUL = failure cycle - CycleTime, capped at `cap` because early in
    life degradation is not visible and an uncapped target only teaches noise.
    """
    if cap < 1:
        raise ValueError(f"RUL cap must be a positive number of cycles, got {cap}")
    ends = failures[[*KEYS, "CycleTime"]].rename(columns={"CycleTime": "failure_cycle"})
    ends = ends.drop_duplicates(KEYS, keep="first")
    labelled = telemetry[[*KEYS, "CycleTime"]].merge(ends, on=KEYS, how="inner")
    remaining = labelled["failure_cycle"] - labelled["CycleTime"]
    labelled["rul"] = remaining.clip(lower=0, upper=cap).astype(np.int64)
    labelled["rul_cap"] = np.int64(cap)  # kept with the labels: a model must know the cap it learnt
    return labelled.sort_values([*KEYS, "CycleTime"], ignore_index=True)

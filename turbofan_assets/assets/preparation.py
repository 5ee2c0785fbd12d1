"""Preparation group: labelled trajectories and the NASA reference test fleet."""

import numpy as np
from dagster import AssetExecutionContext, AutomationCondition, Config, MaterializeResult, asset

from turbofan_assets.resources import WAREHOUSE_POOL, CmapssFiles, Warehouse
from turbofan_core.labels import DEFAULT_RUL_CAP, label_rul
from turbofan_core.telemetry import MEASUREMENTS
from turbofan_warehouse.schema import ensure_schema

GROUP = "preparation"


class LabelConfig(Config):
    rul_cap: int = DEFAULT_RUL_CAP
    """Cycles: earlier in life the RUL target is held at the cap (piecewise-linear RUL)."""


@asset(
    group_name=GROUP,
    deps=["raw_telemetry", "failure_events"],
    pool=WAREHOUSE_POOL,
    automation_condition=AutomationCondition.eager(),
)
def rul_labels(context: AssetExecutionContext, config: LabelConfig, warehouse: Warehouse):
    """RUL for every cycle of every engine lifetime that ended in a failure event.

    Lifetimes with no failure event yet are censored: counted here, never labelled.
    """
    with warehouse.get_connection() as conn:
        ensure_schema(conn)
        telemetry = conn.execute("SELECT device_id, lifetime, CycleTime FROM telemetry").df()
        failures = conn.execute("SELECT device_id, lifetime, CycleTime FROM failure_events").df()
        labels = label_rul(telemetry, failures, cap=config.rul_cap)
        conn.register("new_labels", labels)
        conn.execute("CREATE OR REPLACE TABLE rul_labels AS SELECT * FROM new_labels")
        conn.unregister("new_labels")
    trajectories = telemetry.groupby(["device_id", "lifetime"]).ngroups
    labelled = labels.groupby(["device_id", "lifetime"]).ngroups if len(labels) else 0
    return MaterializeResult(
        metadata={
            "dagster/row_count": len(labels),
            "labelled_trajectories": labelled,
            "censored_trajectories": trajectories - labelled,
            "rul_cap": config.rul_cap,
        }
    )


class ReferenceFleetConfig(Config):
    """Which C-MAPSS test engines to evaluate on: file names in the C-MAPSS folder, or paths. Either
    way the file must be one whose checksum `turbofan_core.cmapss` knows (FD001, the FD002 subset)."""

    test_file: str = "test_FD001.txt"
    """The test engines, each cut before failure."""
    rul_file: str = "RUL_FD001.txt"
    """Their true RUL after the last cycle, one line per test engine."""


@asset(group_name=GROUP, pool=WAREHOUSE_POOL, automation_condition=AutomationCondition.eager())
def reference_test_fleet(config: ReferenceFleetConfig, cmapss: CmapssFiles, warehouse: Warehouse):
    """NASA's test engines (FD001 unless configured) with their true RUL at every cycle: the
    benchmark, never training data.

    Engines are keyed like devices (`Test_001`, lifetime 1) so the same feature code applies.
    """
    fleet = cmapss.trajectories(config.test_file)
    true_end = cmapss.true_rul(config.rul_file)
    last_cycle = fleet.groupby("unit")["CycleTime"].transform("max")
    fleet["rul"] = (fleet["unit"].map(true_end) + last_cycle - fleet["CycleTime"]).astype(np.int64)
    fleet["is_last_cycle"] = fleet["CycleTime"] == last_cycle
    fleet["device_id"] = fleet["unit"].map(lambda unit: f"Test_{unit:03d}")
    fleet["lifetime"] = 1
    table = fleet[["device_id", "lifetime", "CycleTime", *MEASUREMENTS, "rul", "is_last_cycle"]]
    with warehouse.get_connection() as conn:
        conn.register("fleet", table)
        conn.execute("CREATE OR REPLACE TABLE reference_test_fleet AS SELECT * FROM fleet")
        conn.unregister("fleet")
    return MaterializeResult(
        metadata={
            "dagster/row_count": len(table),
            "engines": int(fleet["unit"].nunique()),
            "test_file": config.test_file,
            "rul_file": config.rul_file,
        }
    )

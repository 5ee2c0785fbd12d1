"""Evaluation: the model training just registered, on NASA's FD001 test fleet (the published benchmark).

The published FD001 figures score the last cycle of each of the 100 test engines against
the true RUL capped like the training labels (piecewise-linear RUL); both the capped
(headline) and the uncapped figures are reported. The model is loaded from its bundle,
hash verified, and scored from raw telemetry through the bundle's own feature spec:
exactly the path the edge takes.
"""

import base64
import io

import numpy as np
import pandas as pd
from dagster import AssetExecutionContext, Failure, MaterializeResult, MetadataValue, asset

from turbofan_assets.resources import WAREHOUSE_POOL, FileStore, Warehouse
from turbofan_core import metrics, training
from turbofan_core.bundle import PREDICTION, ModelBundle, quantile_column, read_bundle
from turbofan_core.features import CYCLE
from turbofan_warehouse import registry

GROUP = "training"
KEYS = list(training.KEYS)


def evaluate(bundle: ModelBundle, fleet: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, float]]:
    """Per-engine errors at each engine's last cycle, and the summary figures.

    `fleet` is `reference_test_fleet`: every cycle (the features need the history), the
    true RUL at each cycle and `is_last_cycle`.
    """
    if bundle.quantiles != training.INTERVAL:
        raise Failure(
            f"bundle quantiles {bundle.quantiles}, expected the p10-p90 interval {training.INTERVAL}"
        )
    predicted = bundle.predict(fleet, KEYS)
    truth = fleet.loc[fleet["is_last_cycle"], [*KEYS, CYCLE, "rul"]]
    last = predicted.merge(truth, on=[*KEYS, CYCLE], how="inner", validate="1:1").sort_values("device_id")
    capped = last["rul"].clip(upper=bundle.rul_cap)
    point, lower, upper = (last[c] for c in (PREDICTION, *map(quantile_column, bundle.quantiles)))
    errors = pd.DataFrame(
        {
            "device_id": last["device_id"],
            "last_cycle": last[CYCLE],
            "true_rul": last["rul"],
            "true_rul_capped": capped,
            "predicted": point,
            "p10": lower,
            "p90": upper,
            "error": point - capped,
            "in_interval": (lower <= capped) & (capped <= upper),
            "phm08": metrics.phm08_terms(capped, point),
        }
    ).reset_index(drop=True)
    summary = {
        "engines": len(errors),
        **metrics.regression_report(capped, point),
        "coverage_p10_p90": metrics.interval_coverage(capped, lower, upper),
        "rmse_uncapped": metrics.rmse(last["rul"], point),
        "phm08_uncapped": metrics.phm08_score(last["rul"], point),
        "coverage_p10_p90_uncapped": metrics.interval_coverage(last["rul"], lower, upper),
    }
    return errors, summary


def plot(errors: pd.DataFrame, summary: dict[str, float], title: str) -> bytes:
    """PNG of predicted against true RUL, each engine with its p10-p90 interval."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
    try:
        for inside, colour, label in (
            (True, "tab:blue", "true RUL inside p10-p90"),
            (False, "tab:red", "outside"),
        ):
            rows = errors[errors["in_interval"] == inside]
            ax.errorbar(
                rows["true_rul_capped"],
                rows["predicted"],
                yerr=np.vstack([rows["predicted"] - rows["p10"], rows["p90"] - rows["predicted"]]).clip(
                    min=0
                ),
                fmt="o",
                markersize=4,
                color=colour,
                ecolor=colour,
                alpha=0.7,
                elinewidth=1,
                label=label,
            )
        top = float(max(errors["true_rul_capped"].max(), errors["p90"].max())) + 5
        ax.plot([0, top], [0, top], color="grey", linestyle="--", linewidth=1, label="perfect")
        ax.set(
            xlim=(0, top), ylim=(0, top), xlabel="true RUL (capped), cycles", ylabel="predicted RUL, cycles"
        )
        ax.set_title(
            f"{title}\nRMSE {summary['rmse']:.2f}  MAE {summary['mae']:.2f}  PHM08 {summary['phm08']:.0f}  "
            f"p10-p90 coverage {summary['coverage_p10_p90']:.0%}",
            fontsize=10,
        )
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return buffer.getvalue()


@asset(group_name=GROUP, deps=["reference_test_fleet"], pool=WAREHOUSE_POOL)
def model_evaluation(
    context: AssetExecutionContext, model_candidates: int, warehouse: Warehouse, model_store: FileStore
):
    """The model `model_candidates` registered, on the FD001 test fleet: RMSE, MAE, PHM08, interval coverage.

    Reported, never used to choose: the figures go to `model_evaluations`,
    `evaluation_errors` (one row per engine) and the registry, and show here as
    numeric metadata the UI plots across materialisations, beside the picture.
    """
    with warehouse.get_connection() as conn:
        registry.ensure_registry(conn)
        record = registry.get(conn, model_candidates)
        if record is None:
            raise Failure(f"model version {model_candidates} is not in the registry of this warehouse")
        fleet = conn.execute("SELECT * FROM reference_test_fleet").df()
    with model_store.open() as store:
        bundle = read_bundle(store, record.bundle_sha256)
    errors, summary = evaluate(bundle, fleet)
    with warehouse.get_connection() as conn:
        registry.record_evaluation(conn, record.version, context.run.run_id, summary, errors)
        stage = registry.get(conn, record.version).stage

    picture = base64.b64encode(
        plot(errors, summary, f"model version {record.version} on FD001 test")
    ).decode()
    worst = errors.reindex(errors["error"].abs().sort_values(ascending=False).index)
    return MaterializeResult(
        metadata={
            "version": record.version,
            "stage": stage,
            "bundle_sha256": record.bundle_sha256,
            **{name: float(value) for name, value in summary.items() if name != "engines"},
            "engines": int(summary["engines"]),
            "predicted_vs_true": MetadataValue.md(
                f"![predicted vs true RUL](data:image/png;base64,{picture})"
            ),
            "errors_by_engine": MetadataValue.md(worst.to_markdown(index=False, floatfmt=".1f")),
        }
    )

"""Evaluation: the model training just registered, on NASA's test fleet (the published benchmark).

The published figures score the last cycle of each test engine against the true RUL capped
like the training labels (piecewise-linear RUL); both the capped (headline) and the uncapped
figures are reported, and the error by operating regime and by band of true RUL shows where
the model is weak. The model is loaded from its bundle, hash verified, and scored from raw
telemetry through the bundle's own feature spec: exactly the path the edge takes.
"""

import base64
import io
from typing import Any

import numpy as np
import pandas as pd
from dagster import AssetExecutionContext, Failure, MaterializeResult, MetadataValue, asset

from turbofan_assets.resources import WAREHOUSE_POOL, FileStore, Warehouse
from turbofan_core import metrics, training
from turbofan_core.bundle import PREDICTION, ModelBundle, quantile_column, read_bundle
from turbofan_core.features import CYCLE
from turbofan_core.telemetry import OPERATIONAL_SETTINGS
from turbofan_warehouse import registry

GROUP = "training"
KEYS = list(training.KEYS)
RUL_BAND = 25  # cycles of true (capped) RUL per band; the last band is open-ended
RUL_BANDS = 5


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
    truth = fleet.loc[fleet["is_last_cycle"], [*KEYS, CYCLE, "rul", *OPERATIONAL_SETTINGS]]
    last = predicted.merge(truth, on=[*KEYS, CYCLE], how="inner", validate="1:1").sort_values("device_id")
    capped = last["rul"].clip(upper=bundle.rul_cap)
    regimes = bundle.spec.regimes  # a bundle from before regimes flies one
    settings = last[list(OPERATIONAL_SETTINGS)].to_numpy()
    regime = np.zeros(len(last), dtype=np.int64) if regimes is None else regimes.assign(settings)[0]
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
            "regime": regime,
            "rul_band": [rul_band(int(value)) for value in capped],
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


def _markdown(frame: pd.DataFrame) -> MetadataValue:
    """A table for the UI: counts and cycles as integers, errors to one decimal."""
    formats = [".0f" if pd.api.types.is_integer_dtype(dtype) else ".1f" for dtype in frame.dtypes]
    return MetadataValue.md(frame.to_markdown(index=False, floatfmt=formats))


def rul_band(rul: int) -> str:
    """The band of a true RUL: 0-24, 25-49, ... and the last open-ended (100+)."""
    band = min(rul // RUL_BAND, RUL_BANDS - 1)
    low = band * RUL_BAND
    return f"{low}+" if band == RUL_BANDS - 1 else f"{low}-{low + RUL_BAND - 1}"


def breakdown(errors: pd.DataFrame, by: str) -> pd.DataFrame:
    """Engines, RMSE, MAE and bias (mean of predicted - true, capped) per regime or RUL band, in order."""
    key = errors["true_rul_capped"] if by == "rul_band" else errors[by]
    ordered = errors.iloc[np.argsort(key.to_numpy(), kind="stable")]
    groups = ordered.groupby(by, sort=False)["error"]
    return pd.DataFrame(
        {
            "engines": groups.size(),
            "rmse": groups.apply(lambda e: float(np.sqrt(np.mean(np.square(e))))),
            "mae": groups.apply(lambda e: float(np.mean(np.abs(e)))),
            "bias": groups.mean(),
        }
    ).reset_index()


def plot(errors: pd.DataFrame, summary: dict[str, float], title: str) -> bytes:
    """PNG of predicted against true RUL, each engine with its p10-p90 interval, beside the RMSE
    by operating regime and by band of true RUL."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (ax, by_group) = plt.subplots(1, 2, figsize=(12, 6), dpi=100, width_ratios=(7, 5))
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
        _plot_breakdowns(by_group, errors)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return buffer.getvalue()


def _plot_breakdowns(ax: Any, errors: pd.DataFrame) -> None:
    """Horizontal bars: RMSE per regime, then per RUL band, each labelled with its engines."""
    rows = [
        (f"{label} {value}", rmse, engines)
        for by, label in (("regime", "regime"), ("rul_band", "RUL"))
        for value, engines, rmse in breakdown(errors, by)[[by, "engines", "rmse"]].itertuples(index=False)
    ]
    names, rmse, engines = zip(*rows, strict=True)
    colours = ["tab:purple" if name.startswith("regime") else "tab:green" for name in names]
    bars = ax.barh(range(len(rows)), rmse, color=colours, alpha=0.8)
    ax.bar_label(bars, labels=[f"{n} engines" for n in engines], fontsize=7, padding=2)
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="RMSE, cycles (truth capped)", xlim=(0, max(rmse) * 1.35))
    ax.set_title("error by operating regime and by true RUL", fontsize=10)
    ax.grid(alpha=0.3, axis="x")


@asset(group_name=GROUP, deps=["reference_test_fleet"], pool=WAREHOUSE_POOL)
def model_evaluation(
    context: AssetExecutionContext, model_candidates: int, warehouse: Warehouse, model_store: FileStore
):
    """The model `model_candidates` registered, on the reference test fleet: RMSE, MAE, PHM08,
    interval coverage, and the error by operating regime and by band of true RUL.

    Reported, never used to choose: the figures go to `model_evaluations`,
    `evaluation_errors` (one row per engine, with its regime and band) and the registry, and
    show here as numeric metadata the UI plots across materialisations, beside the picture.
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
        plot(errors, summary, f"model version {record.version} on the reference test fleet")
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
            "errors_by_regime": _markdown(breakdown(errors, "regime")),
            "errors_by_rul_band": _markdown(breakdown(errors, "rul_band")),
            "errors_by_engine": _markdown(worst),
        }
    )

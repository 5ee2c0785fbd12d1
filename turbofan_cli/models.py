"""`turbofan models`: the model registry, read-only. `list` every model; `show VERSION` one in full.

Reads the warehouse's read-only snapshot (as of the pipeline's last write), never the
warehouse file itself, so it answers while a run writes and never blocks one.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from turbofan_cli import CommandError
from turbofan_core.features import FeatureSpec
from turbofan_core.home import Home

if TYPE_CHECKING:
    import duckdb

REASON_WIDTH = 70
SHORT_NAMES = {
    "registered_at": "registered (UTC)",
    "baseline_cv_rmse": "ridge_cv_rmse",
    "test_coverage_p10_p90": "test_coverage",
    "bundle_sha256": "bundle",
}


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="every registered model, newest first").set_defaults(run=run_list)
    show = actions.add_parser("show", help="one model's metrics, params, data watermark and history")
    show.add_argument("version", type=int, help="the model version, as `turbofan models list` shows it")
    show.set_defaults(run=run_show)


@contextmanager
def _registry() -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection to a warehouse snapshot that has a model registry, or a CommandError."""
    from turbofan_warehouse import registry
    from turbofan_warehouse.snapshot import NoSnapshot, read_snapshot

    path = Home.from_env().warehouse
    try:
        with read_snapshot(path) as conn:
            if not registry.exists(conn):
                raise CommandError(f"no model registered yet in {path}: materialise model_candidates first")
            yield conn
    except NoSnapshot as error:
        raise CommandError(f"{error}: run `turbofan demo` (or the pipeline) first") from None


def run_list(args: argparse.Namespace) -> int:
    from turbofan_warehouse import registry

    with _registry() as conn:
        models = registry.table(conn)
    models["registered_at"] = models["registered_at"].dt.strftime("%Y-%m-%d %H:%M")
    models["bundle_sha256"] = models["bundle_sha256"].str[:12]
    models["reason"] = models["reason"].fillna("").map(_shorten)
    models = models.rename(columns=SHORT_NAMES)
    print(models.to_string(index=False, na_rep="-", float_format=lambda value: f"{value:.2f}"))
    return 0


def _shorten(text: str) -> str:
    return text if len(text) <= REASON_WIDTH else text[: REASON_WIDTH - 3] + "..."


def _figure(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def run_show(args: argparse.Namespace) -> int:
    from turbofan_warehouse import registry

    with _registry() as conn:
        record = registry.get(conn, args.version)
        if record is None:
            raise CommandError(f"no model version {args.version}: `turbofan models list` shows the versions")
        events = registry.history(conn, args.version)
    params = " ".join(f"{key}={value}" for key, value in sorted(record.params.items()))
    gate = f"{record.gate}: {record.reason}" if record.gate else "not judged by the promotion gate yet"
    lines = [
        f"model version {record.version} ({record.stage})",
        f"  registered    {record.registered_at:%Y-%m-%d %H:%M:%S} UTC by run {record.run_id}",
        f"  bundle        sha256 {record.bundle_sha256}",
        f"                {record.bundle_location}",
        f"  gate          {gate}",
        f"  params        {params}",
        f"  RUL cap       {record.rul_cap} cycles",
        f"  features      {_spec_summary(FeatureSpec.from_dict(record.feature_spec))}",
        f"  training data {json.dumps(record.data_watermark)}",
        f"  CV            RMSE {record.cv_rmse:.2f} +/- {record.cv_rmse_std:.2f}, MAE {record.cv_mae:.2f} "
        f"({record.cv_folds} trajectory-grouped folds, seed {record.cv_seed}); "
        f"ridge baseline RMSE {record.baseline_cv_rmse:.2f}",
        "  test fleet    "
        + (
            "not evaluated yet (materialise model_evaluation)"
            if record.test_rmse is None
            else f"RMSE {_figure(record.test_rmse)}, MAE {_figure(record.test_mae)}, "
            f"PHM08 {_figure(record.test_phm08, 1)}, p10-p90 coverage {_figure(record.test_coverage_p10_p90)}"
        ),
        "  history",
        *(f"    {at:%Y-%m-%d %H:%M:%S}  {stage:<9}  {reason}" for at, stage, reason in events),
    ]
    print("\n".join(lines))
    return 0


def _spec_summary(spec: FeatureSpec) -> str:
    """The feature spec in one line (the whole of it, regime statistics included, is in the bundle)."""
    regimes = (
        "raw values" if spec.regimes is None else f"standardised in {spec.regimes.count} operating regime(s)"
    )
    windows, alphas = "/".join(map(str, spec.windows)), ", ".join(map(str, spec.ewm_alphas))
    return (
        f"{len(spec.feature_names)} from {len(spec.sensors)} sensors ({', '.join(spec.sensors)}), {regimes}; "
        f"{', '.join(spec.statistics)} over {windows} cycles, smoothing {alphas}"
    )

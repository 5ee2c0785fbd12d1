"""Model selection, the promotion gate and the training assets, on real FD001 data.

The asset tests run the real Dagster assets on FD001 replayed through the simulator,
with a reduced grid and one thread (the default grid is the benchmark's business).
"""

from __future__ import annotations

import base64
import shutil
from dataclasses import fields
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
from dagster import AssetKey, AssetSelection, DagsterInstance, ExecuteInProcessResult, FloatMetadataValue

from simulator.capture_writer import CaptureWriter
from simulator.replay import replay
from turbofan_assets.definitions import PIPELINE_JOB, build_definitions
from turbofan_cli.main import main
from turbofan_core import training
from turbofan_core.bundle import read_bundle
from turbofan_core.cmapss import read_cmapss
from turbofan_core.home import Home
from turbofan_core.labels import DEFAULT_RUL_CAP
from turbofan_core.storage import LocalStore
from turbofan_warehouse import registry
from turbofan_warehouse.snapshot import publish

PREPARATION = [
    "raw_telemetry",
    "telemetry_quarantine",
    "failure_events",
    "rul_labels",
    "reference_test_fleet",
]
TRAINING = ["training_features", "model_candidates", "champion_model", "model_evaluation"]
SMALL_GRID = {"max_depth": [2, 3], "learning_rate": [0.1], "n_estimators": [30, 60], "folds": 3}


def _run(
    home: Home,
    assets: list[str],
    training_config: dict | None = None,
    instance: DagsterInstance | None = None,
) -> ExecuteInProcessResult:
    """Materialise `assets` of the real code location, as the pipeline job would."""
    run_config = {"ops": {"model_candidates": {"config": training_config}}} if training_config else {}
    job = build_definitions(home).resolve_job_def(PIPELINE_JOB)
    return job.execute_in_process(
        asset_selection=[AssetKey(a) for a in assets], run_config=run_config, instance=instance
    )


def _metadata(result: ExecuteInProcessResult, asset: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == AssetKey(asset)]
    return dict(event.event_specific_data.materialization.metadata)


def _values(result: ExecuteInProcessResult, asset: str) -> dict:
    return {key: value.value for key, value in _metadata(result, asset).items()}


@pytest.fixture(scope="module")
def fd001_home(tmp_path_factory: pytest.TempPathFactory, cmapss_dir: Path) -> Path:
    """FD001 train replayed as devices, ingested and labelled, with the test fleet: where training starts."""
    home = Home(tmp_path_factory.mktemp("fd001") / "home")
    with CaptureWriter(LocalStore(home.landing)) as writer:
        replay(read_cmapss(cmapss_dir / "train_FD001.txt"), writer)
    assert _run(home, PREPARATION).success
    return home.root


@pytest.fixture
def home(fd001_home: Path, turbofan_home: Path) -> Home:
    """A private copy of the prepared FD001 state, so every test starts from the same registry (empty)."""
    shutil.copytree(fd001_home, turbofan_home, dirs_exist_ok=True)
    return Home.from_env()


@pytest.fixture(scope="module")
def trained(
    fd001_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, ExecuteInProcessResult]:
    """The prepared state after one run of every training asset with the reduced grid."""
    home = Home(tmp_path_factory.mktemp("trained") / "home")
    shutil.copytree(fd001_home, home.root)
    return home.root, _run(home, TRAINING, SMALL_GRID)


def _trajectories(devices: int, lifetimes: int, cycles: int) -> pd.DataFrame:
    rows = [
        (f"Client_{d:03d}", life, cycle)
        for d in range(devices)
        for life in range(1, lifetimes + 1)
        for cycle in range(1, cycles + 1)
    ]
    return pd.DataFrame(rows, columns=["device_id", "lifetime", "CycleTime"])


def test_grouped_folds_never_split_a_trajectory() -> None:
    frame = _trajectories(devices=7, lifetimes=2, cycles=5)  # 14 trajectories, two per device
    folds = training.trajectory_folds(frame, 4, seed=0)
    per_trajectory = frame.assign(fold=folds).groupby(["device_id", "lifetime"])["fold"].nunique()
    assert (per_trajectory == 1).all()
    sizes = np.bincount(folds) // 5
    assert sorted(sizes) == [3, 3, 4, 4]  # balanced in trajectories

    # Same data, same folds, whatever the row order; another seed, other folds.
    shuffled = frame.sample(frac=1, random_state=1)
    again = pd.Series(training.trajectory_folds(shuffled, 4, seed=0), index=shuffled.index).sort_index()
    assert (again.to_numpy() == folds).all()
    assert not (training.trajectory_folds(frame, 4, seed=1) == folds).all()

    with pytest.raises(ValueError, match="folds"):
        training.trajectory_folds(frame, 15, seed=0)
    with pytest.raises(ValueError, match="folds"):
        training.trajectory_folds(frame, 1, seed=0)


def test_grid_entries_sharing_a_fit_score_like_separate_fits() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 4))
    y = 50 + 20 * X[:, 0] - 10 * X[:, 1] ** 2 + rng.normal(scale=3, size=600)
    folds = np.repeat(np.arange(3), 200)
    grid = training.param_grid([3], [0.1], [10, 25])
    shared = training.cross_validate_xgb(X, y, folds, grid, seed=0)
    separate = [training.cross_validate_xgb(X, y, folds, [p], seed=0)[0] for p in grid]
    for a, b in zip(shared, separate, strict=True):
        np.testing.assert_allclose(a.fold_rmse, b.fold_rmse, rtol=1e-6)
    assert shared[1].rmse < shared[0].rmse
    assert training.best(shared) is shared[1]


def test_the_p90_model_leaves_the_cap() -> None:
    """With capped labels the p90 of the labels is the cap; the quantile model must still learn."""
    rng = np.random.default_rng(0)
    life = rng.uniform(0, 250, size=4000)
    X = np.column_stack([life + rng.normal(scale=5, size=life.size), rng.normal(size=life.size)])
    y = np.minimum(life, DEFAULT_RUL_CAP)
    model = training.fit_quantiles(X, y, {"max_depth": 3, "learning_rate": 0.3, "n_estimators": 60}, seed=0)
    import xgboost as xgb

    near_failure = model.predict(xgb.DMatrix(np.array([[10.0, 0.0]])))[0]
    assert near_failure[0] < near_failure[1] < 40


def test_data_fingerprint_names_the_exact_data() -> None:
    frame = _trajectories(devices=2, lifetimes=1, cycles=3).assign(rul=[2, 1, 0, 2, 1, 0], x=0.5)
    columns = ["device_id", "lifetime", "CycleTime", "rul", "x"]
    assert training.data_fingerprint(frame, columns) == training.data_fingerprint(frame.copy(), columns)
    relabelled = frame.assign(rul=[3, 1, 0, 2, 1, 0])
    assert training.data_fingerprint(relabelled, columns) != training.data_fingerprint(frame, columns)


def test_training_assets_materialise_end_to_end_on_fd001(
    trained: tuple[Path, ExecuteInProcessResult],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    root, result = trained
    assert result.success
    monkeypatch.setenv("TURBOFAN_HOME", str(root))  # for the CLI
    home = Home.from_env()

    with duckdb.connect(str(home.warehouse), read_only=True) as conn:
        # Labels on real data: every FD001 engine ran to failure, labels count down to 0 under the cap.
        ends = conn.execute(
            "SELECT min(rul), max(rul), count(DISTINCT device_id) FROM rul_labels "
            "WHERE CycleTime = failure_cycle"
        ).fetchone()
        assert ends == (0, 0, 100)
        assert conn.execute("SELECT max(rul) FROM rul_labels").fetchone()[0] == DEFAULT_RUL_CAP
        assert conn.execute("SELECT count(*) FROM training_features").fetchone()[0] == 20631
        errors = conn.execute("SELECT * FROM evaluation_errors WHERE version = 1").df()
        registered = conn.execute("SELECT stage, test_rmse FROM model_registry").fetchall()

    candidates = _values(result, "model_candidates")
    assert candidates["version"] == 1
    assert candidates["cv_rmse"] < candidates["baseline_cv_rmse"]
    for name in (
        "ridge",
        "max_depth=2 learning_rate=0.1 n_estimators=30",
        "max_depth=3 learning_rate=0.1 n_estimators=60",
    ):
        assert name in candidates["comparison"]
    assert _values(result, "champion_model")["decision"] == "promoted"

    evaluation = _metadata(result, "model_evaluation")
    for figure in ("rmse", "mae", "phm08", "coverage_p10_p90"):
        assert isinstance(evaluation[figure], FloatMetadataValue)  # plotted by the UI over materialisations
    assert evaluation["engines"].value == 100 and len(errors) == 100
    assert evaluation["rmse"].value < 20  # the reduced grid; the bench holds the real bar
    assert 0.5 < evaluation["coverage_p10_p90"].value <= 1
    assert registered == [("champion", pytest.approx(evaluation["rmse"].value))]
    picture = evaluation["predicted_vs_true"].value
    assert base64.b64decode(picture.split("base64,")[1].rstrip(")")).startswith(b"\x89PNG")
    assert errors["in_interval"].mean() == pytest.approx(evaluation["coverage_p10_p90"].value)

    # The bundle in the model store verifies and scores raw telemetry, as the edge will.
    bundle = read_bundle(LocalStore(home.models), candidates["bundle_sha256"])
    assert bundle.watermark["trajectories"] == 100 and bundle.rul_cap == DEFAULT_RUL_CAP

    assert main(["models", "list"]) == 0
    listing = capsys.readouterr().out
    assert "champion" in listing and candidates["bundle_sha256"][:12] in listing
    assert main(["models", "show", "1"]) == 0
    shown = capsys.readouterr().out
    assert (
        "model version 1 (champion)" in shown
        and "max_depth=" in shown
        and "test fleet    RMSE" in shown
        and "operating regime(s)" in shown
    )
    assert main(["models", "show", "2"]) == 2
    assert "no model version 2" in capsys.readouterr().err


def _shuffle_test_rul(warehouse: Path) -> None:
    """Give each test engine another engine's true RUL: a test fleet whose truth is noise."""
    with duckdb.connect(str(warehouse)) as conn:
        fleet = conn.execute("SELECT * FROM reference_test_fleet").df()
        end = fleet[fleet["is_last_cycle"]].set_index("device_id")["rul"]
        shuffled = pd.Series(np.random.default_rng(0).permutation(end.to_numpy()), index=end.index)
        assert (shuffled != end).mean() > 0.9
        last_cycle = fleet.groupby("device_id")["CycleTime"].transform("max")
        fleet["rul"] = fleet["device_id"].map(shuffled) + last_cycle - fleet["CycleTime"]
        conn.register("shuffled", fleet)
        conn.execute("CREATE OR REPLACE TABLE reference_test_fleet AS SELECT * FROM shuffled")


def test_the_bundle_keeps_the_cap_the_labels_were_made_with(home: Home) -> None:
    """A cap set in the launchpad travels with the labels into the bundle, not guessed from them."""
    run_config = {
        "ops": {"rul_labels": {"config": {"rul_cap": 100}}, "model_candidates": {"config": SMALL_GRID}}
    }
    job = build_definitions(home).resolve_job_def(PIPELINE_JOB)
    selection = [AssetKey(a) for a in ("rul_labels", "training_features", "model_candidates")]
    result = job.execute_in_process(asset_selection=selection, run_config=run_config)
    bundle = read_bundle(LocalStore(home.models), _values(result, "model_candidates")["bundle_sha256"])
    assert bundle.rul_cap == 100


def test_selection_is_unchanged_when_the_test_rul_is_shuffled(
    trained: tuple[Path, ExecuteInProcessResult], turbofan_home: Path
) -> None:
    # Structurally: neither selection nor promotion depends on the test fleet.
    home = Home.from_env()
    graph = build_definitions(home).resolve_asset_graph()
    upstream = AssetSelection.assets("model_candidates", "champion_model").upstream().resolve(graph)
    assert AssetKey("reference_test_fleet") not in upstream

    # In practice: the same selection, scores and model when the test truth is noise.
    root, honest = trained
    shutil.copytree(root, turbofan_home, dirs_exist_ok=True)
    _shuffle_test_rul(home.warehouse)
    shuffled = _run(home, ["training_features", "model_candidates", "model_evaluation"], SMALL_GRID)

    before, after = _values(honest, "model_candidates"), _values(shuffled, "model_candidates")
    assert (after["version"], before["version"]) == (2, 1)
    for key in (
        "selected",
        "cv_rmse",
        "cv_rmse_std",
        "cv_mae",
        "baseline_cv_rmse",
        "comparison",
        "bundle_sha256",
    ):
        assert after[key] == before[key], key
    # The shuffle did reach the evaluation: the same model scores far worse against noise.
    assert _values(shuffled, "model_evaluation")["rmse"] > _values(honest, "model_evaluation")["rmse"] + 10


def test_promotion_accepts_a_better_candidate_and_refuses_a_worse_one(home: Home) -> None:
    weak = {"max_depth": [2], "learning_rate": [0.1], "n_estimators": [30], "folds": 2}
    strong = {**weak, "max_depth": [3], "n_estimators": [60]}
    assert _run(home, ["training_features"]).success

    def gate(config: dict) -> dict:
        return _values(_run(home, ["model_candidates", "champion_model"], config), "champion_model")

    first = gate(weak)
    assert (first["decision"], first["champion_version"]) == ("promoted", 1)
    assert first["reason"].startswith("first champion")

    better = gate(strong)
    assert (better["decision"], better["champion_version"]) == ("promoted", 2)
    assert better["candidate_cv_rmse"] < better["compared_champion_cv_rmse"] == first["candidate_cv_rmse"]

    worse = gate(weak)
    assert (worse["decision"], worse["champion_version"]) == ("refused", 2)
    assert (
        "is not below champion version 2's" in worse["reason"]
        and "same training data and folds" in worse["reason"]
    )

    # Other folds: the champion is re-scored on the candidate's folds before the comparison.
    other_folds = gate({**weak, "seed": 1})
    assert (other_folds["decision"], other_folds["champion_version"]) == ("refused", 2)
    assert "re-scored on the candidate's data and folds" in other_folds["reason"]
    assert other_folds["compared_champion_cv_rmse"] != better["candidate_cv_rmse"]

    # A model that loses to ridge regression never goes to an engine, champion or not.
    useless = gate({**weak, "n_estimators": [2]})
    assert useless["decision"] == "refused" and "does not beat the ridge baseline" in useless["reason"]

    with duckdb.connect(str(home.warehouse), read_only=True) as conn:
        rows = conn.execute("SELECT version, stage, gate FROM model_registry ORDER BY version").fetchall()
        first_reason = conn.execute("SELECT reason FROM model_registry WHERE version = 1").fetchone()[0]
        history = conn.execute(
            "SELECT stage, reason FROM model_stage_events WHERE version = 1 ORDER BY changed_at, rowid"
        ).fetchall()
    assert rows == [
        (1, "archived", "promoted"),
        (2, "champion", "promoted"),
        (3, "candidate", "refused"),
        (4, "candidate", "refused"),
        (5, "candidate", "refused"),
    ]
    assert first_reason.startswith("first champion")  # archiving keeps the reason it was promoted for
    assert [stage for stage, _ in history] == ["candidate", "champion", "archived"]
    assert history[-1][1] == "replaced by version 2"


def test_the_gate_and_the_evaluation_take_the_version_their_upstream_run_registered(home: Home) -> None:
    """Passed by identity, not looked up as the latest: a candidate registered meanwhile by another
    run is not the one judged and evaluated."""
    weak = {"max_depth": [2], "learning_rate": [0.1], "n_estimators": [30], "folds": 2}
    with DagsterInstance.ephemeral() as instance:  # one instance: the second run loads the first's output
        assert _run(home, ["training_features", "model_candidates"], weak, instance).success
        with duckdb.connect(str(home.warehouse)) as conn:
            [first] = registry.table(conn).itertuples()
            record = registry.get(conn, first.version)
            registration = {
                field.name: getattr(record, field.name) for field in fields(registry.Registration)
            }
            registry.register_candidate(
                conn, registry.Registration(**{**registration, "run_id": "another run"})
            )
        later = _run(home, ["champion_model", "model_evaluation"], instance=instance)
    assert _values(later, "champion_model")["candidate_version"] == first.version == 1
    assert _values(later, "model_evaluation")["version"] == 1
    with duckdb.connect(str(home.warehouse), read_only=True) as conn:
        assert registry.get(conn, 2).gate is None  # the other candidate was not judged by this run


def test_models_command_before_any_training_says_what_to_do(
    turbofan_home: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["models", "list"]) == 2
    assert "no warehouse snapshot" in capsys.readouterr().err
    with duckdb.connect(str(turbofan_home / "warehouse.duckdb")) as conn:  # ingested, nothing trained
        publish(conn, turbofan_home / "warehouse.duckdb")
    assert main(["models", "show", "1"]) == 2
    assert "no model registered yet" in capsys.readouterr().err

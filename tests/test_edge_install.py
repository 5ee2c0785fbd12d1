"""The edge's own install: `pip install .` into a fresh virtualenv gives the edge module and the
contract, scores a bundle, and brings none of the pipeline (Dagster, DuckDB, pandas) nor test tools."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO_ROOT
from test_bundle import make_bundle

from turbofan_core.bundle import write_bundle
from turbofan_core.storage import LocalStore

UV = Path(sys.executable).parent / "uv"
PIPELINE_ONLY = ("dagster", "dagster_webserver", "duckdb", "pandas", "sklearn", "playwright", "pytest")

SCORE = """
import importlib.util, json, sys
import numpy as np
from edge_module.model_slot import ModelReference, load
import edge_module.service  # the whole service imports
loaded = load(ModelReference("1", sys.argv[1], sys.argv[2]))
width = len(loaded.bundle.spec.feature_names)
print(json.dumps({
    "absent": [m for m in sys.argv[3:] if importlib.util.find_spec(m) is None],
    "scores": loaded.bundle.predict_matrix(np.arange(width, dtype=float)).tolist(),
}))
"""


@pytest.mark.slow
def test_the_edge_installs_alone_and_scores_a_bundle(tmp_path: Path, fleet: pd.DataFrame) -> None:
    venv = tmp_path / "edge-venv"
    subprocess.run([str(UV), "venv", "-q", "-p", sys.executable, str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run(
        [str(UV), "pip", "install", "-q", "-p", str(python), str(REPO_ROOT)], check=True, timeout=600
    )

    bundle = make_bundle(fleet)
    store = LocalStore(tmp_path / "models")
    path = store.root / write_bundle(store, bundle)
    done = subprocess.run(
        [str(python), "-c", SCORE, str(path), bundle.sha256, *PIPELINE_ONLY],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,  # not the repository: the install only
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["absent"] == list(PIPELINE_ONLY)
    width = len(bundle.spec.feature_names)
    np.testing.assert_allclose(
        answer["scores"], bundle.predict_matrix(np.arange(width, dtype=float)), rtol=1e-6
    )

    site = next((venv / "lib").glob("python*/site-packages"))
    megabytes = sum(f.stat().st_size for f in site.rglob("*") if f.is_file()) / 1e6
    print(f"edge install: {megabytes:.0f} MB in {site}")

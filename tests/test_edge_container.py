"""The edge module's image and IoT Edge module layout, checked without a Docker engine: every file
the Dockerfile copies exists, module.json points at it, and the entry point and health check are
the service's."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT

MODULE = REPO_ROOT / "edge_module"


def test_module_json_points_at_the_dockerfile_and_its_context() -> None:
    module = json.loads((MODULE / "module.json").read_text())
    assert module["image"]["repository"].endswith("/turbofan-edge")
    context = (MODULE / module["image"]["contextPath"]).resolve()
    assert context == REPO_ROOT
    for dockerfile in module["image"]["tag"]["platforms"].values():
        assert (MODULE / dockerfile).is_file()


def test_the_dockerfile_copies_what_exists_and_runs_the_edge_as_a_non_root_user() -> None:
    text = (MODULE / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, flags=re.MULTILINE):
        *sources, _target = line.split()
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"COPY {source}: not in the repository"
    assert re.search(r"^USER turbofan$", text, flags=re.MULTILINE)
    assert "/healthz" in text and 'VOLUME ["/var/lib/turbofan"]' in text
    entry = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, flags=re.MULTILINE)[1])
    done = subprocess.run(
        [str(Path(sys.executable).parent / entry[0]), *entry[1:], "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "--model-uri" in done.stdout


def test_the_image_installs_only_the_edge() -> None:
    """The wheel is built from the three packages the edge needs; its requirements are the edge's."""
    text = (MODULE / "Dockerfile").read_text()
    copied = {
        line.split()[1]
        for line in text.splitlines()
        if line.startswith("COPY turbofan") or line.startswith("COPY edge")
    }
    assert copied == {"turbofan_core", "turbofan_cli", "edge_module"}
    edge_requirements = (REPO_ROOT / "requirements-edge.in").read_text()
    assert "dagster" not in edge_requirements and "duckdb" not in edge_requirements

"""Shared fixtures: real C-MAPSS data, an isolated TURBOFAN_HOME, a real Azurite blob service and a
live Dagster UI (`turbofan ui`) on a state folder filled by `turbofan demo`.

Missing prerequisites fail loudly instead of skipping: a suite that skips its blob or data tests
on a machine without them would report green while testing nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobServiceClient
from iothub_standin import IoTHubStandIn, running_iothub_standin

from turbofan_core.cmapss import read_cmapss

REPO_ROOT = Path(__file__).resolve().parent.parent
AZURITE_BLOB = REPO_ROOT / ".tools" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
AZURITE_START_TIMEOUT_S = 30.0

# The well-known development account of every Azurite install (public, documented by Microsoft).
AZURITE_ACCOUNT_NAME = "devstoreaccount1"
AZURITE_ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


@dataclass(frozen=True)
class AzuriteInfo:
    """How to reach the test Azurite blob service (path-style URL, shared-key auth)."""

    account_url: str
    account_name: str
    account_key: str
    connection_string: str


def _data_folder(variable: str, holds: str, advice: str) -> Path:
    """The folder env `variable` names; the test fails (never skips) when it lacks `holds`."""
    raw = os.environ.get(variable, "")
    path = Path(raw) if raw else None
    if path is None or not (path / holds).is_file():
        pytest.fail(
            f"{variable}={raw!r} has no {holds}. Run `make test`, which sets it, or {advice}", pytrace=False
        )
    return path


@pytest.fixture(scope="session")
def cmapss_dir() -> Path:
    """The folder holding NASA C-MAPSS files (train_FD001.txt, ...), from env CMAPSS_DIR."""
    return _data_folder(
        "CMAPSS_DIR",
        "train_FD001.txt",
        "get the data with `turbofan data fetch` / `turbofan data import DIR` and point CMAPSS_DIR at it.",
    )


@pytest.fixture(scope="session")
def cmapss_fd002_dir() -> Path:
    """The leading units of C-MAPSS FD002 (six operating conditions), from env CMAPSS_FD002_DIR."""
    return _data_folder("CMAPSS_FD002_DIR", "train_FD002.txt", "point it at ../shared/data/cmapss-fd002.")


@pytest.fixture(scope="session")
def fleet(cmapss_dir: Path) -> pd.DataFrame:
    """Ten FD001 train engines as devices (`Client_001`...), run to failure: quick models to train."""
    frame = read_cmapss(cmapss_dir / "train_FD001.txt")
    frame = frame[frame["unit"] <= 10].copy()
    frame["device_id"] = frame["unit"].map(lambda unit: f"Client_{unit:03d}")
    frame["lifetime"] = 1
    return frame


@pytest.fixture
def turbofan_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty TURBOFAN_HOME per test so no test sees another's warehouse or landing zone."""
    home = tmp_path / "turbofan_home"
    home.mkdir()
    monkeypatch.setenv("TURBOFAN_HOME", str(home))
    return home


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 10) -> None:
    """SIGTERM the whole process group (npm shims may spawn children), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def start_azurite(workdir: Path, port: int | None = None) -> tuple[subprocess.Popen[bytes], AzuriteInfo]:
    """A real Azurite blob service keeping its data in `workdir`, ready to serve; stop it with `_stop`.

    Started again on the same folder and port, it serves the same blobs (a landing zone that went away
    and came back)."""
    if not os.access(AZURITE_BLOB, os.X_OK):
        pytest.fail(
            f"{AZURITE_BLOB} is missing: run `make test` (it installs azurite@3.35.0 into .tools/azurite)",
            pytrace=False,
        )
    port = port or free_port()
    log_path = workdir / "azurite.log"
    # A log file, not a pipe: nobody drains a pipe while tests run, and a full pipe blocks the server.
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [
                str(AZURITE_BLOB),
                "--silent",
                "--skipApiVersionCheck",
                "--disableTelemetry",
                "--location",
                str(workdir / "data"),
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    account_url = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT_NAME}"
    info = AzuriteInfo(
        account_url=account_url,
        account_name=AZURITE_ACCOUNT_NAME,
        account_key=AZURITE_ACCOUNT_KEY,
        connection_string=(
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT_NAME};"
            f"AccountKey={AZURITE_ACCOUNT_KEY};BlobEndpoint={account_url};"
        ),
    )
    try:
        _wait_until_ready(proc, info, port, log_path)
    except BaseException:
        _stop(proc)
        raise
    return proc, info


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzuriteInfo]:
    """A real Azurite blob service on a free port, with its data in a temporary folder."""
    proc, info = start_azurite(tmp_path_factory.mktemp("azurite"))
    try:
        yield info
    finally:
        _stop(proc)


def _wait_until_ready(proc: subprocess.Popen[bytes], info: AzuriteInfo, port: int, log_path: Path) -> None:
    """Block until Azurite answers a real authenticated request, or fail with its log."""
    deadline = time.monotonic() + AZURITE_START_TIMEOUT_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"Azurite exited with code {proc.returncode} before it was ready:\n"
                f"{log_path.read_text(errors='replace')}",
                pytrace=False,
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
            with BlobServiceClient.from_connection_string(
                info.connection_string, retry_total=0, connection_timeout=2, read_timeout=5
            ) as client:
                client.get_service_properties()
            return
        except Exception as exc:  # not listening yet, or listening but not serving yet
            last_error = exc
            time.sleep(0.2)
    pytest.fail(
        f"Azurite did not become ready on port {port} within {AZURITE_START_TIMEOUT_S:.0f} s "
        f"(last error: {last_error!r}):\n{log_path.read_text(errors='replace')}",
        pytrace=False,
    )


@pytest.fixture
def blob_container(azurite: AzuriteInfo) -> Iterator[str]:
    """A new, uniquely named, empty container in Azurite; deleted after the test."""
    name = f"test-{uuid.uuid4().hex[:24]}"
    with BlobServiceClient.from_connection_string(azurite.connection_string) as client:
        client.create_container(name)
        yield name
        with contextlib.suppress(ResourceNotFoundError):
            client.delete_container(name)


@pytest.fixture
def iothub_standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[IoTHubStandIn]:
    """A local HTTPS stand-in for IoT Hub's service API (tests/iothub_standin.py). For the test,
    REQUESTS_CA_BUNDLE trusts its CA (azure-iot-hub verifies the server through requests) and
    IOTHUB_CONNECTION_STRING holds its iothubowner policy; both are restored afterwards."""
    with running_iothub_standin(tmp_path / "iothub_standin") as standin:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(standin.ca_cert))
        monkeypatch.setenv("IOTHUB_CONNECTION_STRING", standin.connection_string)
        yield standin


# --- a live Dagster UI -------------------------------------------------------------------------

UI_DEMO_UNITS = "1-3"
UI_DEMO_TIMEOUT_S = 600.0
UI_START_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class DagsterUI:
    """A running `turbofan ui` (`dagster dev`) and the state folder it serves."""

    url: str  # http://127.0.0.1:PORT, no trailing slash
    home: Path  # its TURBOFAN_HOME; the Dagster instance is home / "dagster"
    log_path: Path  # what `dagster dev` printed (webserver, daemon, runs)

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        """POST a GraphQL query to the UI's /graphql; the `data` of the answer."""
        answer = _http_json(f"{self.url}/graphql", {"query": query, "variables": variables or {}})
        assert not answer.get("errors"), answer["errors"]
        return answer["data"]

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def _http_json(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _turbofan_env(home: Path) -> dict[str, str]:
    """The environment of a `turbofan` subprocess on `home` (it derives DAGSTER_HOME from it)."""
    env = {**os.environ, "TURBOFAN_HOME": str(home)}
    env.pop("DAGSTER_HOME", None)
    return env


@pytest.fixture(scope="session")
def dagster_ui(tmp_path_factory: pytest.TempPathFactory, cmapss_dir: Path) -> Iterator[DagsterUI]:
    """`turbofan demo --units 1-3` into a fresh TURBOFAN_HOME, then `turbofan ui` on a free port.

    Yields once the webserver answers and the code location serves its asset nodes. Both are
    real processes (no os.environ change in the test process); `dagster dev` and everything it
    started (code server, daemon, run workers) are stopped as one process group afterwards.
    """
    workdir = tmp_path_factory.mktemp("dagster_ui")
    home = workdir / "turbofan_home"
    home.mkdir()
    turbofan = str(Path(sys.executable).parent / "turbofan")
    env = _turbofan_env(home)

    demo_log = workdir / "demo.log"
    with demo_log.open("wb") as log:
        demo = subprocess.run(
            [turbofan, "demo", "--units", UI_DEMO_UNITS],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=UI_DEMO_TIMEOUT_S,
        )
    if demo.returncode != 0:
        pytest.fail(
            f"`turbofan demo --units {UI_DEMO_UNITS}` exited {demo.returncode}:\n"
            f"{demo_log.read_text(errors='replace')}",
            pytrace=False,
        )

    port = free_port()
    ui_log = workdir / "ui.log"
    # A log file, not a pipe: nobody drains a pipe while tests run, and a full pipe blocks the server.
    with ui_log.open("wb") as log:
        proc = subprocess.Popen(
            [turbofan, "ui", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    ui = DagsterUI(url=f"http://127.0.0.1:{port}", home=home, log_path=ui_log)
    try:
        _wait_for_ui(proc, ui)
        yield ui
    finally:
        # `dagster dev` shuts down gracefully on SIGTERM in a few seconds. It maps SIGTERM to its
        # SIGINT handler, though, so where SIGINT is ignored (a shell's `cmd &` started pytest) it
        # ignores SIGTERM too, and only the SIGKILL after the grace period stops it.
        _stop(proc, grace_s=30)


def _wait_for_ui(proc: subprocess.Popen[bytes], ui: DagsterUI) -> None:
    """Block until the webserver answers /server_info and the code location has loaded its assets."""
    deadline = time.monotonic() + UI_START_TIMEOUT_S
    what = "answer /server_info"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"`turbofan ui` exited with code {proc.returncode} before it was ready:\n{ui.log_tail()}",
                pytrace=False,
            )
        try:
            _http_json(f"{ui.url}/server_info")
            what = "serve the asset nodes of the code location"
            # The code server may still be loading the definitions: no nodes yet, or an error.
            nodes = _http_json(f"{ui.url}/graphql", {"query": "{ assetNodes { id } }"})
            if (nodes.get("data") or {}).get("assetNodes"):
                return
        except (OSError, ValueError):  # not listening yet, or listening but not serving yet
            pass
        time.sleep(1)
    pytest.fail(
        f"the UI on {ui.url} did not {what} within {UI_START_TIMEOUT_S:.0f} s:\n{ui.log_tail()}",
        pytrace=False,
    )

"""Shared fixtures: real C-MAPSS data, an isolated TURBOFAN_HOME and a real Azurite blob service.

Missing prerequisites fail loudly instead of skipping: a suite that skips its blob or data tests
on a machine without them would report green while testing nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobServiceClient

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


@pytest.fixture(scope="session")
def cmapss_dir() -> Path:
    """The folder holding NASA C-MAPSS files (train_FD001.txt, ...), from env CMAPSS_DIR."""
    raw = os.environ.get("CMAPSS_DIR", "")
    path = Path(raw) if raw else None
    if path is None or not (path / "train_FD001.txt").is_file():
        pytest.fail(
            f"C-MAPSS data not found (CMAPSS_DIR={raw!r} has no train_FD001.txt). Run `make test`, "
            "which sets CMAPSS_DIR, or get the data with `turbofan data fetch` / "
            "`turbofan data import DIR` and point CMAPSS_DIR at it.",
            pytrace=False,
        )
    return path


@pytest.fixture
def turbofan_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty TURBOFAN_HOME per test so no test sees another's warehouse or landing zone."""
    home = tmp_path / "turbofan_home"
    home.mkdir()
    monkeypatch.setenv("TURBOFAN_HOME", str(home))
    return home


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the whole process group (npm shims may spawn children), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzuriteInfo]:
    """A real Azurite blob service on a free port, with its data in a temporary folder."""
    if not os.access(AZURITE_BLOB, os.X_OK):
        pytest.fail(
            f"{AZURITE_BLOB} is missing: run `make test` (it installs azurite@3.35.0 into .tools/azurite)",
            pytrace=False,
        )
    workdir = tmp_path_factory.mktemp("azurite")
    port = _free_port()
    log_path = workdir / "azurite.log"
    # A log file, not a pipe: nobody drains a pipe while tests run, and a full pipe blocks the server.
    with log_path.open("wb") as log:
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

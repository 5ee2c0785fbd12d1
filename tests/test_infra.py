"""Tests of the test and CI infrastructure itself: Azurite fixtures, dagster-azure, the pytest guard."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient
from conftest import AZURITE_ACCOUNT_KEY, REPO_ROOT, AzuriteInfo
from dagster_azure.blob import AzureBlobStorageKeyCredential, AzureBlobStorageResource

PYTEST_GUARD = REPO_ROOT / ".ci" / "pytest-guard"


@pytest.mark.azurite
def test_azurite_roundtrip_with_azure_sdk(azurite: AzuriteInfo, blob_container: str) -> None:
    with BlobServiceClient.from_connection_string(azurite.connection_string) as client:
        container = client.get_container_client(blob_container)
        container.upload_blob("hub/00/2024/01/02/03/04.avro", b"payload-1")
        assert [b.name for b in container.list_blobs()] == ["hub/00/2024/01/02/03/04.avro"]
        assert container.download_blob("hub/00/2024/01/02/03/04.avro").readall() == b"payload-1"


@pytest.mark.azurite
def test_dagster_azure_key_credential_works_against_azurite(
    azurite: AzuriteInfo, blob_container: str
) -> None:
    """The production resource (account URL + shared key) talks to Azurite unchanged.

    It works because azure-storage-blob takes the account name from the URL path when the host
    starts with `localhost` or `127.0.0.1` (see test_key_credential_needs_a_local_host_for_path_style).
    """
    resource = AzureBlobStorageResource(
        account_url=azurite.account_url,
        credential=AzureBlobStorageKeyCredential(key=azurite.account_key),
    )
    with resource.get_client() as client:
        assert client.account_name == azurite.account_name
        container = client.get_container_client(blob_container)
        container.upload_blob("from-dagster.json", b'{"CycleTime": 1}')
        names = [b.name for b in container.list_blobs()]
        data = container.download_blob("from-dagster.json").readall()
    assert names == ["from-dagster.json"]
    assert data == b'{"CycleTime": 1}'
    # And what dagster wrote is visible to a plain SDK client: same account, same container.
    with BlobServiceClient.from_connection_string(azurite.connection_string) as plain:
        assert plain.get_blob_client(blob_container, "from-dagster.json").download_blob().readall() == data


def test_key_credential_needs_a_local_host_for_path_style() -> None:
    """Documents a limit: a path-style URL on any other host (e.g. a compose service `azurite`)
    cannot use AzureBlobStorageKeyCredential, because the key alone carries no account name and
    azure-storage-blob only reads the account from the path for localhost/127.0.0.1 hosts."""
    resource = AzureBlobStorageResource(
        account_url="http://azurite:10000/devstoreaccount1",
        credential=AzureBlobStorageKeyCredential(key=AZURITE_ACCOUNT_KEY),
    )
    with pytest.raises(ValueError, match="Unable to determine account name"), resource.get_client():
        pass


def _guard(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PYTEST_GUARD), "-p", "no:cacheprovider", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_pytest_guard_turns_no_tests_collected_into_failure(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _guard(str(empty), cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "collected no tests (exit 5)" in result.stderr


def test_pytest_guard_propagates_other_exit_codes(tmp_path: Path) -> None:
    (tmp_path / "test_ok.py").write_text("def test_ok():\n    pass\n")
    (tmp_path / "test_bad.py").write_text("def test_bad():\n    assert False\n")
    assert _guard(str(tmp_path / "test_ok.py"), cwd=tmp_path).returncode == 0
    assert _guard(str(tmp_path / "test_bad.py"), cwd=tmp_path).returncode == 1
    # Usage error (4) passes through untouched, so only 5 is rewritten.
    assert _guard("--no-such-option", str(tmp_path), cwd=tmp_path).returncode == 4


def test_make_test_and_ci_run_go_through_the_guard(tmp_path: Path) -> None:
    """`make test` must run pytest via the guard, and `.ci/run` must end in `exec make test`."""
    # -n prints the recipes without running them; PYTEST_ARGS shows up on the guard's line.
    dry = subprocess.run(
        ["make", "-n", "-C", str(REPO_ROOT), "test", f"PYTEST_ARGS={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MAKEFLAGS": ""},
    )
    assert dry.returncode == 0, dry.stderr
    assert f".ci/pytest-guard {tmp_path}" in dry.stdout.splitlines()
    assert "python -m pytest" not in dry.stdout  # nothing bypasses the guard
    ci_run = (REPO_ROOT / ".ci" / "run").read_text()
    assert ci_run.rstrip().splitlines()[-1] == "exec make test"
    assert os.access(REPO_ROOT / ".ci" / "run", os.X_OK)
    assert os.access(PYTEST_GUARD, os.X_OK)

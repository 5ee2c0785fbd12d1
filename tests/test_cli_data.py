"""`turbofan data` and `turbofan simulate` as a user runs them: real files, a real HTTP server, exit codes."""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from turbofan_cli.main import main
from turbofan_core.capture import read_capture
from turbofan_core.cmapss import FD001_FILES, UNIT, read_cmapss, verify
from turbofan_core.storage import LocalStore

FILES = FD001_FILES


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass(frozen=True)
class Served:
    folder: Path
    url: str


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Served]:
    """A folder served over HTTP on 127.0.0.1 from a thread, as a stand-in for NASA's server."""
    folder = tmp_path / "www"
    folder.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield Served(folder, f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def imported(home: Path) -> Path:
    return home / "data" / "cmapss"


def test_import_copies_and_verifies(
    cmapss_dir: Path, turbofan_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["data", "import", str(cmapss_dir)]) == 0
    assert str(imported(turbofan_home)) in capsys.readouterr().out
    assert sorted(path.name for path in imported(turbofan_home).iterdir()) == sorted(FILES)  # no temp files
    for name in FILES:
        verify(imported(turbofan_home) / name)


def test_tampered_copy_is_refused_and_nothing_is_copied(
    cmapss_dir: Path, turbofan_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(cmapss_dir, copy)
    data = bytearray((copy / "test_FD001.txt").read_bytes())
    data[100] = ord("9") if data[100] != ord("9") else ord("8")
    (copy / "test_FD001.txt").write_bytes(bytes(data))

    assert main(["data", "import", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "test_FD001.txt" in err and "train_FD001.txt" not in err and err.count("\n") == 1
    assert not imported(turbofan_home).exists()


def test_missing_file_is_refused(
    cmapss_dir: Path, turbofan_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("train_FD001.txt", "test_FD001.txt"):
        shutil.copy(cmapss_dir / name, tmp_path / name)
    assert main(["data", "import", str(tmp_path)]) == 2
    assert "RUL_FD001.txt is missing" in capsys.readouterr().err
    assert not imported(turbofan_home).exists()


@pytest.mark.parametrize("layout", ["nested like NASA's archive", "CMAPSSData.zip itself"])
def test_fetch_installs_from_a_zip_of_zips(
    layout: str, cmapss_dir: Path, turbofan_home: Path, serve: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    cmapss_zip = zip_of({name: (cmapss_dir / name).read_bytes() for name in FILES} | {"readme.txt": b"NASA"})
    if layout == "CMAPSSData.zip itself":
        archive = cmapss_zip
    else:
        folder = "6. Turbofan Engine Degradation Simulation Data Set"
        archive = zip_of(
            {f"{folder}/CMAPSSData.zip": cmapss_zip, f"__MACOSX/{folder}/._CMAPSSData.zip": b"x"}
        )
    (serve.folder / "archive.zip").write_bytes(archive)

    assert main(["data", "fetch", "--url", f"{serve.url}/archive.zip"]) == 0
    assert str(imported(turbofan_home)) in capsys.readouterr().out
    for name in FILES:
        verify(imported(turbofan_home) / name)


def test_fetch_from_an_unreachable_server_suggests_import(
    turbofan_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["data", "fetch", "--url", f"http://127.0.0.1:{port}/x.zip", "--timeout", "5"]) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("turbofan: error: cannot download") and "turbofan data import DIR" in error
    assert not imported(turbofan_home).exists()


def test_fetch_of_an_archive_without_the_files(
    turbofan_home: Path, serve: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    (serve.folder / "other.zip").write_bytes(zip_of({"readme.txt": b"no data here"}))
    assert main(["data", "fetch", "--url", f"{serve.url}/other.zip"]) == 2
    assert "no train_FD001.txt, test_FD001.txt, RUL_FD001.txt" in capsys.readouterr().err


def test_path_shows_where_the_pipeline_reads_and_whether_it_verifies(
    cmapss_dir: Path, turbofan_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CMAPSS_DIR", raising=False)
    assert main(["data", "path"]) == 1
    out, err = capsys.readouterr()
    assert out == f"{imported(turbofan_home)}\n" and "train_FD001.txt" in err and "missing" in err

    assert main(["data", "import", str(cmapss_dir)]) == 0
    capsys.readouterr()
    assert main(["data", "path"]) == 0
    out, err = capsys.readouterr()
    assert out == f"{imported(turbofan_home)}\n" and err.count("verified") == 3

    monkeypatch.setenv("CMAPSS_DIR", str(cmapss_dir))
    assert main(["data", "path"]) == 0
    assert capsys.readouterr().out == f"{cmapss_dir.absolute()}\n"


def test_simulate_end_to_end_prints_the_summary(
    cmapss_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = cmapss_dir / "train_FD001.txt"
    assert main(["simulate", "--file", str(train), "--units", "1-3", "--landing-dir", str(tmp_path)]) == 0
    store = LocalStore(tmp_path)
    records = [r for name in store.list_names() for r in read_capture(store.read(name))]
    messages = int((read_cmapss(train)[UNIT] <= 3).sum())
    assert len(records) == messages + 3
    summary = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines())
    assert {key: value.strip() for key, value in summary.items() if key != "seconds"} == {
        "devices": "3",
        "messages": str(messages),
        "failure events": "3",
        "files": str(len(list(store.list_names()))),
        "where": str(tmp_path),
    }


def test_help_is_fast_because_nothing_heavy_is_imported() -> None:
    check = (
        "import sys; from turbofan_cli.main import main; main(['--help']); assert 'pandas' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", check], check=True, capture_output=True)

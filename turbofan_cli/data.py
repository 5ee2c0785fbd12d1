"""`turbofan data`: get NASA's C-MAPSS files into TURBOFAN_HOME, checked against the published sha256.

Every model and metric depends on these files being NASA's, so nothing is installed unless all
three verify, and each copy is atomic (temporary file + rename): the pipeline never reads a mix.
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from turbofan_cli import CommandError
from turbofan_core.cmapss import FD001_FILES, ChecksumMismatch, verify
from turbofan_core.home import Home

NASA_URL = "https://phm-datasets.s3.amazonaws.com/NASA/6.+Turbofan+Engine+Degradation+Simulation+Data+Set.zip"
_CHUNK = 1 << 20


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    files = ", ".join(FD001_FILES)
    importer = actions.add_parser(
        "import", help=f"verify and copy {files} from a folder", description=f"Verify and copy {files}."
    )
    importer.add_argument("directory", type=Path, help="folder holding the unzipped C-MAPSS files")
    importer.set_defaults(run=run_import)
    fetch = actions.add_parser("fetch", help="download NASA's archive, verify and install it")
    fetch.add_argument("--url", default=NASA_URL, help="archive holding CMAPSSData.zip (default: NASA's)")
    fetch.add_argument("--timeout", type=float, default=60.0, help="seconds without data before giving up")
    fetch.set_defaults(run=run_fetch)
    path = actions.add_parser(
        "path",
        help="print the folder the pipeline reads C-MAPSS from",
        description="Print the folder on stdout, and on stderr whether each file verifies (exit 1 if not).",
    )
    path.set_defaults(run=run_path)


def check_files(directory: Path) -> dict[str, str | None]:
    """Each C-MAPSS file's problem in `directory`, or None when it is the published file."""
    problems: dict[str, str | None] = {}
    for name in FD001_FILES:
        path = directory / name
        try:
            verify(path)
            problems[name] = None
        except FileNotFoundError:
            problems[name] = f"{path} is missing"
        except ChecksumMismatch as error:
            problems[name] = str(error)
        except OSError as error:
            problems[name] = f"{path}: {error.strerror or error}"
    return problems


def install(source: Path, target: Path) -> None:
    """Copy the three files from `source` to `target` after all verified; otherwise copy nothing."""
    if not source.is_dir():
        raise CommandError(f"{source} is not a folder")
    problems = [problem for problem in check_files(source).values() if problem]
    if problems:
        raise CommandError("; ".join(problems) + "; nothing was copied")
    target.mkdir(parents=True, exist_ok=True)
    for name in FD001_FILES:
        _copy_atomically(source / name, target / name)


def _copy_atomically(source: Path, target: Path) -> None:
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as data:
            while chunk := data.read(_CHUNK):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException:
        os.unlink(temporary)
        raise


def _install_and_report(source: Path) -> int:
    home = Home.from_env()
    install(source, home.imported_data)
    print(f"installed {', '.join(FD001_FILES)} (sha256 verified) in {home.imported_data}")
    if home.cmapss_dir() != home.imported_data:
        print(f"note: CMAPSS_DIR is set, so the pipeline reads {home.cmapss_dir()} instead")
    return 0


def run_import(args: argparse.Namespace) -> int:
    return _install_and_report(args.directory)


def run_fetch(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="turbofan-fetch-") as scratch:
        archive = Path(scratch) / "archive.zip"
        _download(args.url, archive, args.timeout)
        unpacked = Path(scratch) / "cmapss"
        unpacked.mkdir()
        try:
            with zipfile.ZipFile(archive) as outer:
                found = _find_in_zip(outer, set(FD001_FILES))
        except zipfile.BadZipFile as error:
            raise CommandError(f"{args.url}: not a readable zip archive ({error})") from None
        missing = [name for name in FD001_FILES if name not in found]
        if missing:
            raise CommandError(f"{args.url}: no {', '.join(missing)} in the archive or the zips inside it")
        for name, data in found.items():
            (unpacked / name).write_bytes(data)
        return _install_and_report(unpacked)


def _download(url: str, target: Path, timeout: float) -> None:
    print(f"downloading {url}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, target.open("wb") as out:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, file=sys.stderr, disable=None) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (OSError, http.client.HTTPException, ValueError) as error:  # URLError and timeouts are OSErrors
        reason = error if isinstance(error, urllib.error.HTTPError) else getattr(error, "reason", error)
        raise CommandError(
            f"cannot download {url} ({reason}); without internet access, get CMAPSSData.zip elsewhere, "
            "unzip it and run `turbofan data import DIR`"
        ) from None


def _find_in_zip(archive: zipfile.ZipFile, wanted: set[str]) -> dict[str, bytes]:
    """The wanted files by name, searching zips inside the zip too (NASA nests CMAPSSData.zip in a folder)."""
    found: dict[str, bytes] = {}
    for info in archive.infolist():
        name = PurePosixPath(info.filename).name
        if name in wanted and name not in found:
            found[name] = archive.read(info)
        elif name.lower().endswith(".zip") and not name.startswith("._"):  # ._ files are macOS metadata
            with zipfile.ZipFile(io.BytesIO(archive.read(info))) as inner:
                found |= _find_in_zip(inner, wanted - found.keys())
        if found.keys() == wanted:
            break
    return found


def run_path(args: argparse.Namespace) -> int:
    directory = Home.from_env().cmapss_dir()
    print(directory)
    problems = check_files(directory)
    for name, problem in problems.items():
        print(f"{name}: {problem or 'verified'}", file=sys.stderr)
    return 1 if any(problems.values()) else 0

"""NASA C-MAPSS files: reading them, and checking that a copy is the published one.

The files are whitespace-separated text, one row per engine cycle:
unit, cycle, three operational settings, 21 sensors. Columns are named as in the
telemetry contract so a replayed row and a device message look the same.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from turbofan_core.telemetry import FIELDS

UNIT = "unit"
COLUMNS: tuple[str, ...] = (UNIT, *FIELDS)

# sha256 of the files in NASA's published archive (CMAPSSData.zip, FD001 subset).
PUBLISHED_SHA256: dict[str, str] = {
    "train_FD001.txt": "963b5e22825b34d8b21c69e1aeb4af3e647050eb672ee8834ba4b5d91d2de0f8",
    "test_FD001.txt": "3cda7109ce17bafb5443f2ac926cfcf88154b941b8c4cf95eb55d1ddd6f52851",
    "RUL_FD001.txt": "a19c8ec94931949d0485bdc35118206e9c81c4547b422efb9cf86f4ceddbceca",
    # FD002 (six operating conditions): the leading units only (train 1-85, test 1-128), as in
    # ../shared/data/cmapss-fd002; NASA's whole files have other checksums.
    "train_FD002.txt": "ecd95467bdeba0b38e12897cc8bf0f283e49876885056c4aaea7eaae13edc64f",
    "test_FD002.txt": "bdfc3d2c9063dd6e7fbf2393e614c9985e173c5b7e73f38e194832c18ac3a14d",
    "RUL_FD002.txt": "ca4ae69264442f97f5b68d3cfeaa5541d5fba248d8575adbd63bd6b52832291a",
}


# The embedded default: what `turbofan data` installs and the pipeline reads unless configured.
FD001_FILES: tuple[str, ...] = ("train_FD001.txt", "test_FD001.txt", "RUL_FD001.txt")


class ChecksumMismatch(ValueError):
    """A C-MAPSS file differs from the published one."""


def read_cmapss(path: str | Path) -> pd.DataFrame:
    """Read a train or test file into a frame with `unit` and the contract's fields."""
    frame = pd.read_csv(path, sep=r"\s+", header=None, index_col=False, engine="c")
    if frame.shape[1] != len(COLUMNS) or frame.isna().any().any():
        raise ValueError(f"{path}: not a C-MAPSS file (expected {len(COLUMNS)} columns per row)")
    frame.columns = list(COLUMNS)
    return frame.astype({UNIT: np.int64, "CycleTime": np.int64})


def read_true_rul(path: str | Path) -> pd.Series:
    """Read an RUL file: the true remaining life after the last cycle of each test unit."""
    values = pd.read_csv(path, sep=r"\s+", header=None, names=["rul"], engine="c")["rul"]
    values.index = pd.RangeIndex(1, len(values) + 1, name=UNIT)
    return values.astype(np.int64)


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: str | Path) -> None:
    """Raise ChecksumMismatch unless `path` is byte for byte the published file of that name."""
    path = Path(path)
    expected = PUBLISHED_SHA256.get(path.name)
    if expected is None:
        raise ChecksumMismatch(f"{path.name}: not a known C-MAPSS file ({', '.join(PUBLISHED_SHA256)})")
    actual = sha256_of(path)
    if actual != expected:
        raise ChecksumMismatch(f"{path}: sha256 {actual} is not the published {expected}")

"""Where the embedded default keeps its state: one folder, `TURBOFAN_HOME` (default `.turbofan/`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Home:
    root: Path

    @classmethod
    def from_env(cls) -> Home:
        return cls(Path(os.environ.get("TURBOFAN_HOME", ".turbofan")).absolute())

    @property
    def landing(self) -> Path:
        return self.root / "landing"

    @property
    def warehouse(self) -> Path:
        return self.root / "warehouse.duckdb"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def dagster(self) -> Path:
        return self.root / "dagster"

    @property
    def imported_data(self) -> Path:
        return self.root / "data" / "cmapss"

    def cmapss_dir(self) -> Path:
        """C-MAPSS files: `CMAPSS_DIR` when set, else the copy `turbofan data` made."""
        configured = os.environ.get("CMAPSS_DIR")
        return Path(configured).absolute() if configured else self.imported_data

"""Resources: where files and tables live, swapped by configuration, never by code.

The landing zone and the model store are both immutable file stores: a local folder
on the embedded default, an Azure Blob container in a real deployment (through
dagster-azure's AzureBlobStorageResource, which also works against Azurite).
"""

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import duckdb
import pandas as pd
from dagster import ConfigurableResource
from dagster_azure.blob import AzureBlobStorageResource
from dagster_duckdb import DuckDBResource

from turbofan_core import cmapss
from turbofan_core.storage import BlobStore, LocalStore, ObjectStore
from turbofan_warehouse.snapshot import publish, read_snapshot

# Every asset that writes the warehouse holds this Dagster pool; dagster.yaml limits each pool
# to one holder, so writers run one after another however runs are started.
WAREHOUSE_POOL = "warehouse"


class Warehouse(DuckDBResource):
    """The DuckDB warehouse: `get_connection()` for writers (inside the WAREHOUSE_POOL), which
    publishes a read-only snapshot when it closes; `read()` for everything else (checks)."""

    @contextmanager
    def get_connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with super().get_connection() as conn:
            yield conn
            publish(conn, Path(self.database))

    @contextmanager
    def read(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with read_snapshot(Path(self.database)) as conn:
            yield conn


class FileStore(ConfigurableResource):
    """What assets ask for: a store of immutable files, wherever it lives."""

    def open(self) -> AbstractContextManager[ObjectStore]:
        raise NotImplementedError


class LocalFolder(FileStore):
    """An immutable file store in a local folder."""

    path: str

    @contextmanager
    def open(self) -> Iterator[ObjectStore]:
        yield LocalStore(self.path)


class AzureContainer(FileStore):
    """An immutable file store in an Azure Blob container (created when missing)."""

    storage: AzureBlobStorageResource
    container: str
    prefix: str = ""

    @contextmanager
    def open(self) -> Iterator[ObjectStore]:
        with self.storage.get_client() as service:
            yield BlobStore.created_if_missing(service.get_container_client(self.container), self.prefix)


class CmapssFiles(ConfigurableResource):
    """The NASA C-MAPSS files, checked against the published checksums before use."""

    directory: str

    def path(self, name: str) -> Path:
        path = Path(self.directory) / name
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: run `turbofan data fetch` or `turbofan data import DIR`, "
                "or set CMAPSS_DIR"
            )
        cmapss.verify(path)
        return path

    def trajectories(self, name: str) -> pd.DataFrame:
        return cmapss.read_cmapss(self.path(name))

    def true_rul(self, name: str) -> pd.Series:
        return cmapss.read_true_rul(self.path(name))

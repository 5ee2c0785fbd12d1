"""Immutable file stores: a local folder or an Azure Blob container, behind one interface.

The landing zone and the model store both hold files that are written once and never
changed, so the only write is `write_new`: it either creates the whole file or, when the
name is taken, fails (or picks the next free name). A reader never sees half a file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from azure.storage.blob import ContainerClient

TMP_DIR = ".incoming"
# The landing zone in a blob container: its name, and the account's connection string (a secret).
LANDING_CONTAINER_ENV = "TURBOFAN_LANDING_CONTAINER"
CONNECTION_STRING_ENV = "AZURE_STORAGE_CONNECTION_STRING"
# What writers that publish by rename (azcopy, hdfs, rsync, our LocalStore) call a file being
# written; such names are never listed, so a reader only sees files once they are whole.
TEMPORARY_SUFFIXES = (".tmp", ".part", ".partial", "._COPYING_")


def is_temporary(name: str) -> bool:
    """A name under which a file is still being written: hidden (`.x`) or with a temporary suffix."""
    return any(part.startswith(".") for part in name.split("/")) or name.endswith(TEMPORARY_SUFFIXES)


@dataclass(frozen=True, slots=True)
class StoredFile:
    """A listed file; `version` changes whenever its content may have (an etag, or size and mtime)."""

    name: str
    size: int
    version: str


class NameTaken(FileExistsError):
    """The name is already used by an immutable file."""


class ObjectStore(Protocol):
    """Where immutable files live; names use `/` as separator."""

    location: str

    def list_names(self, prefix: str = "") -> Iterator[str]:
        """Every whole file's name under `prefix`, in lexicographic order."""
        ...

    def list_files(self, prefix: str = "") -> Iterator[StoredFile]:
        """Every whole file under `prefix` with its size and version, in name order."""
        ...

    def read(self, name: str) -> bytes: ...

    def create(self, name: str, data: bytes) -> None:
        """Write `name` whole, or raise NameTaken if it exists; never overwrites."""
        ...


def write_new(store: ObjectStore, name: str, data: bytes) -> str:
    """Create `name`, or `name-0001`, `name-0002`... when taken; return the name used.

    The suffix keeps names sortable in write order within one minute's batch.
    """
    candidate, attempt = name, 0
    while True:
        try:
            store.create(candidate, data)
            return candidate
        except NameTaken:
            attempt += 1
            candidate = f"{name}-{attempt:04d}"


class LocalStore:
    """A folder. Files are written to a temporary name and linked into place atomically."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.location = str(self.root)

    def list_names(self, prefix: str = "") -> Iterator[str]:
        return (file.name for file in self.list_files(prefix))

    def list_files(self, prefix: str = "") -> Iterator[StoredFile]:
        if not self.root.exists():
            return iter(())
        found = []
        for directory, subdirs, files in os.walk(self.root):
            subdirs[:] = [d for d in subdirs if not d.startswith(".")]
            rel = Path(directory).relative_to(self.root).as_posix()
            for file in files:
                name = file if rel == "." else f"{rel}/{file}"
                if name.startswith(prefix) and not is_temporary(name):
                    try:
                        stat = os.stat(Path(directory) / file)
                    except FileNotFoundError:  # removed while listing
                        continue
                    found.append(StoredFile(name, stat.st_size, f"{stat.st_size}:{stat.st_mtime_ns}"))
        return iter(sorted(found, key=lambda file: file.name))

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def create(self, name: str, data: bytes) -> None:
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = self.root / TMP_DIR
        staging.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=staging)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.link(tmp, target)  # fails if the name exists: never overwrites
        except FileExistsError:
            raise NameTaken(name) from None
        finally:
            os.unlink(tmp)


class BlobStore:
    """An Azure Blob container (or Azurite); creation is conditional on the name being free."""

    def __init__(self, container: ContainerClient, prefix: str = "") -> None:
        self.container = container
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        # container.url carries the SAS token of a SAS connection string: never put it in a location.
        self.location = f"{container.url.partition('?')[0]}/{self.prefix}"

    def list_names(self, prefix: str = "") -> Iterator[str]:
        cut = len(self.prefix)
        names = self.container.list_blob_names(name_starts_with=self.prefix + prefix)
        return (name[cut:] for name in names if not is_temporary(name[cut:]))

    def list_files(self, prefix: str = "") -> Iterator[StoredFile]:
        cut = len(self.prefix)
        for blob in self.container.list_blobs(name_starts_with=self.prefix + prefix):
            if not is_temporary(blob.name[cut:]):
                yield StoredFile(blob.name[cut:], blob.size, blob.etag)

    @classmethod
    def created_if_missing(cls, container: ContainerClient, prefix: str = "") -> BlobStore:
        """A store on `container`, creating the container first when it does not exist yet."""
        from azure.core.exceptions import ResourceExistsError

        try:
            container.create_container()
        except ResourceExistsError:
            pass
        return cls(container, prefix)

    def read(self, name: str) -> bytes:
        return self.container.download_blob(self.prefix + name).readall()

    def create(self, name: str, data: bytes) -> None:
        from azure.core.exceptions import ResourceExistsError

        try:
            self.container.upload_blob(self.prefix + name, data, overwrite=False)
        except ResourceExistsError:
            raise NameTaken(name) from None


def blob_store_from_connection_string(connection_string: str, container: str, prefix: str = "") -> BlobStore:
    """A BlobStore for a container, created if missing (used by devices and the CLI), through
    `turbofan_core.azure_settings`: bounded timeouts and retries, errors naming the setting."""
    from turbofan_core.azure_settings import blob_store

    return blob_store(container, prefix, connection_string)

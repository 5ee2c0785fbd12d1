"""The model the edge scores with, swapped atomically and only for a bundle that verifies and loads.

A bundle reference (version, URI, sha256) is fetched, its hash verified, loaded and warmed
(one prediction) by `load()` while the current model keeps scoring; only then `install()`
makes it current. A bundle that fails any step is refused with its reason and the current
one keeps serving. The previous model is kept for `rollback()`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from turbofan_core.bundle import BundleError, ModelBundle, load_bundle
from turbofan_core.telemetry import MEASUREMENTS


class ModelRefused(ValueError):
    """A bundle that cannot serve: not found, wrong hash, unreadable or incompatible."""


@dataclass(frozen=True)
class ModelReference:
    """Where a model is and what it must hash to: the module's desired state."""

    version: str
    uri: str  # a local path, file://, or an http(s) blob URL readable with the edge's blob settings
    sha256: str


@dataclass(frozen=True)
class LoadedModel:
    reference: ModelReference
    bundle: ModelBundle = field(repr=False)
    loaded_at: datetime


def fetch(uri: str) -> bytes:
    """The bundle's bytes from a local path, a file:// URL or a blob URL."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme else uri).read_bytes()
    if parsed.scheme in ("http", "https"):
        from azure.storage.blob import BlobClient

        blob = BlobClient.from_blob_url(uri, retry_total=2, connection_timeout=5, read_timeout=30)
        return blob.download_blob().readall()
    raise ModelRefused(f"unsupported bundle URI scheme {parsed.scheme!r}")


def load(reference: ModelReference) -> LoadedModel:
    """Fetch, verify, load and warm a bundle, or raise ModelRefused with the reason."""
    try:
        data = fetch(reference.uri)
    except ModelRefused:
        raise
    except Exception as error:  # a missing file, an unreachable or refusing blob service
        raise ModelRefused(f"cannot fetch {reference.uri}: {type(error).__name__}: {error}") from None
    try:
        bundle = load_bundle(data, reference.sha256)
    except BundleError as error:
        raise ModelRefused(f"bundle refused: {error}") from None
    except Exception as error:  # bytes that hash right but are no bundle: not a zip, members missing
        raise ModelRefused(f"bundle refused: unreadable: {type(error).__name__}: {error}") from None
    unknown = sorted(set(bundle.spec.sensors) - set(MEASUREMENTS))
    if unknown:
        raise ModelRefused(f"bundle needs inputs devices do not send: {unknown}")
    try:
        warm = bundle.predict_matrix(np.zeros((1, len(bundle.spec.feature_names))))
    except Exception as error:
        raise ModelRefused(f"bundle does not score: {type(error).__name__}: {error}") from None
    if warm.shape != (1, len(bundle.prediction_columns)):
        raise ModelRefused(f"bundle scores {warm.shape} columns, expected {len(bundle.prediction_columns)}")
    return LoadedModel(reference, bundle, datetime.now(UTC))


class ModelSlot:
    """The current model and the one before it; swaps and rollbacks are atomic."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: LoadedModel | None = None
        self._previous: LoadedModel | None = None

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    def install(self, loaded: LoadedModel) -> LoadedModel:
        """Make a model `load()` returned current (loading it is the slow part, done before)."""
        with self._lock:
            if self._current is not None and self._current.reference.sha256 == loaded.reference.sha256:
                return self._current
            self._previous, self._current = self._current, loaded
            return loaded

    def rollback(self) -> LoadedModel:
        with self._lock:
            if self._previous is None:
                raise ModelRefused("no previous model to roll back to")
            self._previous, self._current = self._current, self._previous
            return self._current

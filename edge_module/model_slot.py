"""The model the edge scores with, swapped atomically and only for a bundle that verifies and loads.

A bundle reference (version, URI, sha256) is fetched, its hash verified, loaded and warmed
(one prediction) by `load()` while the current model keeps scoring; only then `install()`
makes it current. A bundle that fails any step is refused with its reason and the current
one keeps serving. The previous model is kept for `rollback()`.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

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
        return _fetch_blob(uri)
    raise ModelRefused(f"unsupported bundle URI scheme {parsed.scheme!r}")


def _fetch_blob(url: str) -> bytes:
    """A blob: read with the account of AZURE_STORAGE_CONNECTION_STRING when the URL is on it (a
    private model store, the pipeline's own setting), else as the URL itself allows (SAS, public)."""
    from azure.storage.blob import BlobClient

    from turbofan_core import azure_settings

    if os.environ.get(azure_settings.STORAGE_CONNECTION_STRING_ENV, "").strip():
        account = azure_settings.storage_account()
        container, _, name = url.removeprefix(account.account_url + "/").partition("/")
        if url.startswith(account.account_url + "/") and name:
            with azure_settings.storage_errors_named(account):
                blob = azure_settings.blob_service_client().get_blob_client(container, unquote(name))
                return blob.download_blob().readall()
    policy = azure_settings.client_policy()
    blob = BlobClient.from_blob_url(
        url,
        retry_total=policy.retries,
        connection_timeout=policy.connect_timeout_s,
        read_timeout=policy.read_timeout_s,
    )
    return blob.download_blob().readall()


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

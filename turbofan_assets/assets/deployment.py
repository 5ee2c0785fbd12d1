"""Deployment: the champion model, named in an IoT Edge deployment manifest and applied to the edge.

`edge_deployment_manifest` writes the manifest (runtime, the turbofan module, routes, and the
champion's bundle as the module's desired model), validates it, and stores it under its sha256
in the model store; its value is that hash. `edge_deployment` applies the manifest of that hash
through the `deployment_target` resource and records the outcome in the warehouse, refusals
included; a refused deployment fails the run and leaves the previous one current.
"""

from collections.abc import Iterator
from typing import Any

import duckdb
from dagster import (
    AssetExecutionContext,
    AutomationCondition,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    Output,
    asset,
)

from turbofan_assets.deployment_targets import DeploymentRefused, DeploymentTarget
from turbofan_assets.resources import WAREHOUSE_POOL, FileStore, Warehouse
from turbofan_core import deployment_manifest
from turbofan_core.bundle import BundleError, bundle_name, read_bundle
from turbofan_core.deployment_manifest import ManifestError, ManifestSettings
from turbofan_core.storage import LocalStore, ObjectStore
from turbofan_warehouse import deployments, registry
from turbofan_warehouse.snapshot import NoSnapshot

GROUP = "deployment"


class ManifestConfig(Config):
    """What the deployment runs besides the model (see turbofan_core/deployment_manifest.py)."""

    image: str = deployment_manifest.DEFAULT_IMAGE
    """The module image, repository:tag."""
    registry: str = ""
    """The registry server the image is pulled from, e.g. myregistry.azurecr.io (empty: a local image)."""
    env: dict[str, str] = {}
    """The module's environment; no secrets (the validator refuses names like *_KEY or *_PASSWORD)."""
    create_options: dict[str, Any] = deployment_manifest.DEFAULT_CREATE_OPTIONS
    """Docker create options of the module container."""
    runtime_version: str = deployment_manifest.DEFAULT_RUNTIME_VERSION
    """Of the edgeAgent and edgeHub images."""
    ttl_seconds: int = deployment_manifest.DEFAULT_TTL_SECONDS
    """How long edgeHub keeps messages it cannot send upstream."""


def _in_service(warehouse: Warehouse, target: str) -> deployments.Deployment | None:
    """The deployment the target is serving, from the read snapshot (none before the first)."""
    try:
        with warehouse.read() as conn:
            return deployments.current(conn, target)
    except (NoSnapshot, duckdb.CatalogException):
        return None


def bundle_uri(store: ObjectStore, sha256: str) -> str:
    """Where the edge fetches the bundle: its absolute path in a local store, else its blob URL."""
    if isinstance(store, LocalStore):
        return str((store.root / bundle_name(sha256)).absolute())
    return f"{store.location.rstrip('/')}/{bundle_name(sha256)}"


@asset(
    group_name=GROUP,
    deps=["champion_model"],
    output_required=False,
    automation_condition=AutomationCondition.eager(),
)
def edge_deployment_manifest(
    context: AssetExecutionContext,
    config: ManifestConfig,
    warehouse: Warehouse,
    model_store: FileStore,
    deployment_target: DeploymentTarget,
) -> Iterator[Output[str]]:
    """The IoT Edge deployment manifest serving the champion, stored under its sha256 (the value).

    The champion's bundle is verified in the model store first, so the manifest never names a
    bundle that is missing or altered; the manifest is validated before it is stored. A manifest
    the target already serves is not materialised again, so nothing is deployed when the gate
    refused a candidate (the champion, and so the manifest, did not change); after a refused
    deployment, it is, so the deployment is tried again.
    """
    with warehouse.read() as conn:
        champion = registry.champion(conn) if registry.exists(conn) else None
    if champion is None:
        raise Failure("no champion model to deploy: materialise model_candidates and champion_model first")
    settings = ManifestSettings(
        image=config.image,
        registry=config.registry,
        env=config.env,
        create_options=config.create_options,
        runtime_version=config.runtime_version,
        ttl_seconds=config.ttl_seconds,
    )
    with model_store.open() as store:
        try:
            read_bundle(store, champion.bundle_sha256)
        except (BundleError, OSError) as error:
            raise Failure(f"champion version {champion.version}'s bundle: {error}") from None
        model = {
            "version": str(champion.version),
            "uri": bundle_uri(store, champion.bundle_sha256),
            "sha256": champion.bundle_sha256,
        }
        manifest = deployment_manifest.build(settings, model)
        try:
            deployment_manifest.validate(manifest)
        except ManifestError as error:
            raise Failure(str(error)) from None
        sha256 = deployment_manifest.save(store, manifest)
        location = f"{store.location.rstrip('/')}/{deployment_manifest.manifest_name(sha256)}"
    in_service = _in_service(warehouse, deployment_target.name())
    if in_service is not None and in_service.manifest_sha256 == sha256:
        context.log.info(f"{deployment_target.name()} already serves manifest {sha256}: nothing to deploy")
        return
    yield Output(
        sha256,
        metadata={
            "manifest_sha256": sha256,
            "model_version": champion.version,
            "bundle_uri": model["uri"],
            "stored_at": MetadataValue.path(location),
            "manifest": MetadataValue.json(manifest),
        },
    )


@asset(group_name=GROUP, pool=WAREHOUSE_POOL, automation_condition=AutomationCondition.eager())
def edge_deployment(
    context: AssetExecutionContext,
    edge_deployment_manifest: str,
    deployment_target: DeploymentTarget,
    warehouse: Warehouse,
    model_store: FileStore,
) -> MaterializeResult:
    """The manifest `edge_deployment_manifest` stored, applied through `deployment_target`.

    Every attempt is recorded in `deployments` (manifest hash, model version, target, time,
    applied or refused and why). A refusal fails the run; the deployment in service stays the
    last one applied.
    """
    try:  # what leaves is checked again: the stored file, verified against its name
        with model_store.open() as store:
            manifest = deployment_manifest.load(store, edge_deployment_manifest)
        deployment_manifest.validate(manifest)
    except ManifestError as error:
        raise Failure(str(error)) from None
    version = int(deployment_manifest.model_reference(manifest)["version"])
    target = deployment_target.name()
    refusal = None
    try:
        result = deployment_target.apply(manifest)
    except DeploymentRefused as error:
        result, refusal = deployments.REFUSED, error.reason
    with warehouse.get_connection() as conn:
        deployments.record(
            conn, edge_deployment_manifest, version, target, result, refusal, context.run.run_id
        )
        in_service = deployments.current(conn, target)
    metadata: dict[str, Any] = {
        "target": target,
        "manifest_sha256": edge_deployment_manifest,
        "model_version": version,
        "result": result,
    }
    if in_service is not None:
        metadata |= {
            "in_service_manifest_sha256": in_service.manifest_sha256,
            "in_service_model_version": in_service.model_version,
        }
    if refusal is not None:
        raise Failure(
            f"{target} refused manifest {edge_deployment_manifest} (model version {version}): {refusal}",
            metadata={**metadata, "reason": refusal},
        )
    context.log.info(f"{target}: manifest {edge_deployment_manifest} {result}, model version {version}")
    return MaterializeResult(metadata=metadata)

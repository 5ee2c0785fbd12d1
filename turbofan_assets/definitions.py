"""The Dagster code location: assets, checks, jobs and resources chosen from the environment.

Embedded default: everything under TURBOFAN_HOME. Set TURBOFAN_LANDING_CONTAINER (and
TURBOFAN_MODEL_CONTAINER) to use Azure Blob containers instead, on the account of
AZURE_STORAGE_CONNECTION_STRING (the one storage setting of every part, turbofan_core.azure_settings).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from azure.storage.blob import BlobServiceClient
from dagster import (
    AssetSelection,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    Definitions,
    EnvVar,
    define_asset_job,
    in_process_executor,
    load_assets_from_modules,
)
from dagster_azure.blob import AzureBlobStorageAnonymousCredential, AzureBlobStorageResource

from turbofan_assets.assets import deployment, evaluation, ingestion, preparation, training
from turbofan_assets.checks import CHECKS
from turbofan_assets.deployment_targets import deployment_target
from turbofan_assets.resources import AzureContainer, CmapssFiles, FileStore, LocalFolder, Warehouse
from turbofan_assets.sensors import (
    RETRAIN_AFTER_ENV,
    RetrainPolicy,
    ingest_job,
    landing_zone_sensor,
    retrain_job,
    retrain_policy_sensor,
    retrain_schedule,
)
from turbofan_core.azure_settings import (
    STORAGE_CONNECTION_STRING_ENV,
    blob_service_client,
    storage_account,
    storage_errors_named,
)
from turbofan_core.home import Home
from turbofan_core.storage import LANDING_CONTAINER_ENV

PIPELINE_JOB = "turbofan_pipeline"
DEPLOYMENT_JOB = "turbofan_deployment"


class ConnectionStringBlobStorage(AzureBlobStorageResource):
    """dagster-azure's blob resource on the storage connection string, which stays an `EnvVar`
    read at run time: the UI lists the variable, never its key. Its clients time out and retry
    as every Azure client here does, and failing to reach the account names the setting."""

    connection_string: str

    @contextmanager
    def get_client(self) -> Iterator[BlobServiceClient]:
        account = storage_account(self.connection_string)
        with blob_service_client(account.connection_string) as service, storage_errors_named(account):
            yield service


def file_store(container_variable: str, local_path: Path) -> FileStore:
    """A blob container when `container_variable` is set in the environment, else a local folder."""
    container = os.environ.get(container_variable)
    if not container:
        return LocalFolder(path=str(local_path))
    return AzureContainer(
        storage=ConnectionStringBlobStorage(
            account_url=storage_account().account_url,  # checks the setting now: a clear error at load
            credential=AzureBlobStorageAnonymousCredential(),  # unused: the connection string holds the key
            connection_string=EnvVar(STORAGE_CONNECTION_STRING_ENV),
        ),
        container=container,
    )


def build_definitions(home: Home) -> Definitions:
    return Definitions(
        assets=load_assets_from_modules([ingestion, preparation, training, evaluation, deployment]),
        asset_checks=CHECKS,
        jobs=[
            # Deploying needs a target (a running edge module, or IoT Hub): a job of its own.
            define_asset_job(
                PIPELINE_JOB, selection=AssetSelection.all() - AssetSelection.groups(deployment.GROUP)
            ),
            define_asset_job(DEPLOYMENT_JOB, selection=AssetSelection.groups(deployment.GROUP)),
            ingest_job,
            retrain_job,
        ],
        schedules=[retrain_schedule],
        sensors=[
            landing_zone_sensor,
            retrain_policy_sensor,
            AutomationConditionSensorDefinition(
                "automation",
                target=AssetSelection.all(),
                default_status=DefaultSensorStatus.RUNNING,
                minimum_interval_seconds=5,
                description="Declarative automation: re-materialises the labels and features when new "
                "telemetry or failure events were ingested, and the reference test fleet once.",
            ),
        ],
        resources={
            "landing_zone": file_store(LANDING_CONTAINER_ENV, home.landing),
            "model_store": file_store("TURBOFAN_MODEL_CONTAINER", home.models),
            "warehouse": Warehouse(database=str(home.warehouse)),
            "cmapss": CmapssFiles(directory=str(home.cmapss_dir())),
            "deployment_target": deployment_target(),
            "retrain_policy": RetrainPolicy(
                min_new_trajectories=int(
                    os.environ.get(RETRAIN_AFTER_ENV, RetrainPolicy().min_new_trajectories)
                )
            ),
        },
        # One process: the multiprocess executor costs seconds a step on 2 cores, and
        # DuckDB takes one writer at a time anyway.
        executor=in_process_executor,
    )


defs = build_definitions(Home.from_env())

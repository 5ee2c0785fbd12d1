"""The Dagster code location: assets, checks, jobs and resources chosen from the environment.

Embedded default: everything under TURBOFAN_HOME. Set TURBOFAN_LANDING_CONTAINER (and
TURBOFAN_MODEL_CONTAINER) to use Azure Blob containers instead; the account comes from
AZURE_STORAGE_ACCOUNT_URL and the key from AZURE_STORAGE_KEY, read at run time only.
"""

from __future__ import annotations

import os
from pathlib import Path

from dagster import (
    AssetSelection,
    Definitions,
    EnvVar,
    define_asset_job,
    in_process_executor,
    load_assets_from_modules,
)
from dagster_azure.blob import AzureBlobStorageKeyCredential, AzureBlobStorageResource

from turbofan_assets.assets import evaluation, ingestion, preparation, training
from turbofan_assets.checks import CHECKS
from turbofan_assets.resources import AzureContainer, CmapssFiles, FileStore, LocalFolder, Warehouse
from turbofan_core.home import Home
from turbofan_core.storage import LANDING_CONTAINER_ENV

PIPELINE_JOB = "turbofan_pipeline"


def file_store(container_variable: str, local_path: Path) -> FileStore:
    """A blob container when `container_variable` is set in the environment, else a local folder."""
    container = os.environ.get(container_variable)
    if not container:
        return LocalFolder(path=str(local_path))
    return AzureContainer(
        storage=AzureBlobStorageResource(
            account_url=EnvVar("AZURE_STORAGE_ACCOUNT_URL"),
            credential=AzureBlobStorageKeyCredential(key=EnvVar("AZURE_STORAGE_KEY")),
        ),
        container=container,
    )


def build_definitions(home: Home) -> Definitions:
    return Definitions(
        assets=load_assets_from_modules([ingestion, preparation, training, evaluation]),
        asset_checks=CHECKS,
        jobs=[define_asset_job(PIPELINE_JOB, selection=AssetSelection.all())],
        resources={
            "landing_zone": file_store(LANDING_CONTAINER_ENV, home.landing),
            "model_store": file_store("TURBOFAN_MODEL_CONTAINER", home.models),
            "warehouse": Warehouse(database=str(home.warehouse)),
            "cmapss": CmapssFiles(directory=str(home.cmapss_dir())),
        },
        # One process: the multiprocess executor costs seconds a step on 2 cores, and
        # DuckDB takes one writer at a time anyway.
        executor=in_process_executor,
    )


defs = build_definitions(Home.from_env())

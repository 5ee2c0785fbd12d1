"""`turbofan edge serve`: the IoT Edge module's REST service on this machine (FastAPI under uvicorn).

Its state (device registry, durable history and outbox, the model it was told to serve) lives in
`--state` (default `$TURBOFAN_HOME/edge`); what it accepts is forwarded to the landing zone the
pipeline ingests (default `$TURBOFAN_HOME/landing`). Imports nothing of Dagster.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from turbofan_core.home import Home
from turbofan_core.storage import LANDING_CONTAINER_ENV

if TYPE_CHECKING:
    from edge_module.model_slot import ModelReference
    from turbofan_core.storage import ObjectStore

# Paths (not secrets) for containers, where flags are fixed in the image's entry point.
TLS_CERT_ENV, TLS_KEY_ENV = "TURBOFAN_GATEWAY_CERT", "TURBOFAN_GATEWAY_KEY"


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    serve = actions.add_parser("serve", help="serve POST /telemetry, /score, /model, /metrics")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--state", type=Path, help="state folder (default: $TURBOFAN_HOME/edge)")
    serve.add_argument(
        "--landing-dir",
        type=Path,
        help=f"where to forward (default: the blob container env {LANDING_CONTAINER_ENV} names, "
        "else $TURBOFAN_HOME/landing)",
    )
    serve.add_argument(
        "--model-uri", help="bundle to serve at start (a path or blob URL), with --model-sha256"
    )
    serve.add_argument("--model-sha256", help="the bundle's sha256, checked before it serves")
    serve.add_argument("--model-version", default="unversioned", help="the version to report for it")
    serve.add_argument(
        "--manifest",
        type=Path,
        help="an IoT Edge deployment manifest (edge_deployment_manifest's): serve the model its turbofan "
        "module twin's desired properties name, instead of --model-uri",
    )
    serve.add_argument(
        "--tls-cert",
        type=Path,
        default=os.environ.get(TLS_CERT_ENV) or None,
        help="the gateway's certificate (PEM), naming the host devices use as GatewayHostName; with "
        f"--tls-key, devices can connect over MQTT (see `turbofan edge certs`; default: env {TLS_CERT_ENV})",
    )
    serve.add_argument(
        "--tls-key",
        type=Path,
        default=os.environ.get(TLS_KEY_ENV) or None,
        help=f"the gateway certificate's private key (PEM; default: env {TLS_KEY_ENV})",
    )
    serve.add_argument("--mqtt-port", type=int, default=8883, help="the gateway's MQTT-over-TLS port")
    serve.add_argument(
        "--dedupe-hours",
        type=float,
        help="how long the ids of a closed engine lifetime's messages are remembered as duplicates; "
        "they are held in memory, about 200 bytes each (default: 24)",
    )
    serve.set_defaults(run=run_serve)
    certs = actions.add_parser("certs", help="make a test CA and a gateway certificate for a host name")
    certs.add_argument("--host", required=True, help="the GatewayHostName devices will connect to")
    certs.add_argument("--out", type=Path, help="folder for the files (default: the state folder's certs/)")
    certs.add_argument("--state", type=Path, help="state folder (default: $TURBOFAN_HOME/edge)")
    certs.set_defaults(run=run_certs)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from edge_module.gateway import GatewaySettings
    from edge_module.model_slot import ModelReference
    from edge_module.service import EdgeConfig, create_app
    from turbofan_cli import CommandError
    from turbofan_core.storage import LocalStore

    home = Home.from_env()
    if bool(args.model_uri) != bool(args.model_sha256):
        raise CommandError("--model-uri and --model-sha256 go together")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise CommandError("--tls-cert and --tls-key go together")
    if args.dedupe_hours is not None and not args.dedupe_hours >= 0:  # NaN too
        raise CommandError(f"--dedupe-hours is {args.dedupe_hours}: give 0 or more")
    gateway = (
        GatewaySettings(args.tls_cert, args.tls_key, host=args.host, port=args.mqtt_port)
        if args.tls_cert
        else None
    )
    model = ModelReference(args.model_version, args.model_uri, args.model_sha256) if args.model_uri else None
    if args.manifest is not None:
        if model is not None:
            raise CommandError("--manifest and --model-uri each name the model: give one")
        model = _manifest_model(args.manifest)
    config = EdgeConfig(
        state_dir=args.state or home.root / "edge",
        landing=LocalStore(args.landing_dir) if args.landing_dir else _landing(home),
        model=model,
        gateway=gateway,
        **({} if args.dedupe_hours is None else {"dedupe_window_seconds": args.dedupe_hours * 3600}),
    )
    print(
        f"edge module on http://{args.host}:{args.port} (docs at /docs), state in {config.state_dir}",
        flush=True,
    )
    if gateway is None:
        print(
            "MQTT gateway off: give --tls-cert and --tls-key (`turbofan edge certs` makes them)", flush=True
        )
    else:
        print(f"MQTT gateway on {args.host}:{args.mqtt_port} (TLS)", flush=True)
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="warning")
    return 0


def run_certs(args: argparse.Namespace) -> int:
    from edge_module.certs import write_certs
    from turbofan_cli import CommandError

    folder = args.out or (args.state or Home.from_env().root / "edge") / "certs"
    try:
        paths = write_certs(folder, args.host)
    except ValueError as error:
        raise CommandError(str(error)) from None
    print(f"CA certificate (give it to devices as server_verification_cert): {paths.ca_cert}")
    print(f"gateway certificate for {args.host}: {paths.server_cert}")
    print(f"its private key (keep it on the gateway): {paths.server_key}")
    print(f"serve with: turbofan edge serve --tls-cert {paths.server_cert} --tls-key {paths.server_key}")
    return 0


def _manifest_model(path: Path) -> ModelReference:
    """The model a deployment manifest's turbofan module twin desires (the manifest validated first)."""
    import json

    from edge_module.model_slot import ModelReference
    from turbofan_cli import CommandError
    from turbofan_core.deployment_manifest import ManifestError, model_reference, validate

    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        validate(manifest)
        return ModelReference(**model_reference(manifest))
    except (OSError, ValueError) as error:  # ManifestError and JSONDecodeError are ValueErrors
        problems = "; ".join(error.problems) if isinstance(error, ManifestError) else str(error)
        raise CommandError(f"--manifest {path}: {problems}") from None


def _landing(home: Home) -> ObjectStore:
    """The landing zone the environment names (a blob container), else the embedded default's."""
    from turbofan_cli import CommandError
    from turbofan_core.azure_settings import SettingError, landing_store_from_env

    try:
        return landing_store_from_env(home.landing)
    except SettingError as error:  # names the setting, never its secret
        raise CommandError(str(error)) from None

"""`turbofan edge serve`: the IoT Edge module's REST service on this machine (FastAPI under uvicorn).

Its state (device registry, durable history and outbox, the model it was told to serve) lives in
`--state` (default `$TURBOFAN_HOME/edge`); what it accepts is forwarded to the landing zone the
pipeline ingests (default `$TURBOFAN_HOME/landing`). Imports nothing of Dagster.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from turbofan_core.home import Home
from turbofan_core.storage import CONNECTION_STRING_ENV, LANDING_CONTAINER_ENV


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    serve = actions.add_parser("serve", help="serve POST /telemetry, /score, /model, /metrics")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--state", type=Path, help="state folder (default: $TURBOFAN_HOME/edge)")
    serve.add_argument("--landing-dir", type=Path, help="where to forward (default: $TURBOFAN_HOME/landing)")
    serve.add_argument(
        "--model-uri", help="bundle to serve at start (a path or blob URL), with --model-sha256"
    )
    serve.add_argument("--model-sha256", help="the bundle's sha256, checked before it serves")
    serve.add_argument("--model-version", default="unversioned", help="the version to report for it")
    serve.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from edge_module.model_slot import ModelReference
    from edge_module.service import EdgeConfig, create_app
    from turbofan_cli import CommandError
    from turbofan_core.storage import LocalStore, blob_store_from_connection_string

    home = Home.from_env()
    if bool(args.model_uri) != bool(args.model_sha256):
        raise CommandError("--model-uri and --model-sha256 go together")
    model = ModelReference(args.model_version, args.model_uri, args.model_sha256) if args.model_uri else None
    config = EdgeConfig(
        state_dir=args.state or home.root / "edge",
        landing=(
            blob_store_from_connection_string(
                os.environ[CONNECTION_STRING_ENV], os.environ[LANDING_CONTAINER_ENV]
            )
            if args.landing_dir is None and os.environ.get(LANDING_CONTAINER_ENV)
            else LocalStore(args.landing_dir or home.landing)
        ),
        model=model,
    )
    print(
        f"edge module on http://{args.host}:{args.port} (docs at /docs), state in {config.state_dir}",
        flush=True,
    )
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="warning")
    return 0

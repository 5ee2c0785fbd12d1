"""`turbofan live`: the whole system on this machine, running, as `make demo` shows it.

Starts the edge module (REST and its MQTT gateway), `dagster dev` (webserver and daemon: the
sensors and automation) and the simulator streaming FD001's training engines through the
gateway with the Azure IoT device SDK, a few messages delivered twice. Engines fail as they fly;
once enough have (the retrain policy), the first model is trained, judged by the gate, deployed
to the edge by automation, and the edge's answers switch to it; later models follow as more
engines complete. One line per event; each process logs to `$TURBOFAN_HOME/logs/`. Ctrl-C stops
everything; the next run resumes from the state folder (messages already taken are answered
"duplicate").
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from turbofan_cli import CommandError
from turbofan_cli.dagster_home import ensure_dagster_home
from turbofan_core.home import Home

GATEWAY_HOST = "localhost"  # the name in the gateway's certificate and the devices' GatewayHostName
MQTT_PORT = 8883  # azure-iot-device always connects to 8883
START_SECONDS = 180.0
POLL_SECONDS = 2.0
DUPLICATES = 0.01
LATE = 0.01


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--units", default="1-100", help="train units to fly, e.g. 1-20 (default: all 100)")
    parser.add_argument("--rate", type=float, default=10.0, help="cycles per second per engine (default 10)")
    parser.add_argument("--ui-port", type=int, default=3000, help="the Dagster UI's port (default 3000)")
    parser.add_argument("--edge-port", type=int, default=8080, help="the edge's REST port (default 8080)")
    parser.add_argument(
        "--retrain-after",
        type=int,
        default=10,
        metavar="N",
        help="retrain once N more engines have failed since the latest model's data (default 10)",
    )
    parser.set_defaults(run=run)


@dataclass
class _Process:
    """A child in its own process group (so stopping it stops its children), logging to `log`."""

    name: str
    log: Path
    command: list[str]
    env: dict[str, str]
    popen: subprocess.Popen = field(init=False)

    def start(self) -> None:
        """Start it, or start it again: the log goes on where it stopped."""
        with self.log.open("ab") as handle:
            self.popen = subprocess.Popen(
                self.command, stdout=handle, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class _Seen:
    """What the event lines have already told."""

    files: int = 0
    ingested: int = 0
    models: dict[int, str] = field(default_factory=dict)  # version -> stage
    deployments: int = 0
    serving: str | None = None


def run(args: argparse.Namespace) -> int:
    from turbofan_assets.sensors import RETRAIN_AFTER_ENV
    from turbofan_cli.demo import import_data
    from turbofan_cli.simulate import parse_units

    parse_units(args.units)  # a bad range or a busy port fails before anything starts
    _check_ports(args)
    home = Home.from_env()
    data = import_data(home)
    ensure_dagster_home(home)
    edge_dir = home.root / "edge"
    certs, admin_key_file, devices_file = _prepare_edge(edge_dir, _device_names(args.units))
    logs = home.root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "TURBOFAN_HOME": str(home.root),
        "DAGSTER_HOME": str(home.dagster),
        "CMAPSS_DIR": str(data),
        "TURBOFAN_EDGE_ADMIN_KEY_FILE": str(admin_key_file),
        "TURBOFAN_EDGE_URL": f"http://127.0.0.1:{args.edge_port}",
        RETRAIN_AFTER_ENV: str(args.retrain_after),
    }
    processes: list[_Process] = []
    # Ctrl-C, even where a shell started this in the background with SIGINT ignored, and SIGTERM
    # (a service manager) both stop every process cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        edge = _start(processes, "edge", logs, env, [
            str(bin_dir / "turbofan"), "edge", "serve", "--host", "127.0.0.1", "--port", str(args.edge_port),
            "--state", str(edge_dir), "--landing-dir", str(home.landing),
            "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
        ])  # fmt: skip
        _wait(edge, f"http://127.0.0.1:{args.edge_port}/healthz")
        print(f"edge module (pid {edge.popen.pid}) ready", flush=True)
        ui_url = f"http://127.0.0.1:{args.ui_port}"
        dagster = _start(processes, "dagster", logs, env, [
            str(bin_dir / "dagster"), "dev", "-m", "turbofan_assets.definitions", "-h", "127.0.0.1",
            "-p", str(args.ui_port),
        ])  # fmt: skip
        _wait(dagster, f"{ui_url}/server_info")
        print(f"Dagster UI: {ui_url}  (sensors and automation running)", flush=True)
        print(f"edge: http://127.0.0.1:{args.edge_port}/docs, MQTT gateway {GATEWAY_HOST}:{MQTT_PORT}")
        simulator = _start(processes, "simulator", logs, env, [
            str(bin_dir / "turbofan"), "simulate", "--file", str(data / "train_FD001.txt"),
            "--units", args.units, "--to", "iothub", "--connection-strings", str(devices_file),
            "--ca-file", str(certs.ca_cert), "--rate", str(args.rate), "--duplicates", str(DUPLICATES),
            "--late", str(LATE),
        ])  # fmt: skip
        print(f"simulator: FD001 train units {args.units} through the gateway; logs in {logs}", flush=True)
        _follow(home, processes, simulator, f"http://127.0.0.1:{args.edge_port}")
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave processes behind
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _stop_all(processes)
    print(f"stopped. `make demo` resumes from {home.root}")
    return 0


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _device_names(units: str) -> list[str]:
    from simulator.replay import device_ids
    from turbofan_cli.simulate import parse_units

    return device_ids(parse_units(units))


def _check_ports(args: argparse.Namespace) -> None:
    """Each port free, or one line saying which is taken and how to choose another."""
    for host, port, how in (
        ("127.0.0.1", args.ui_port, "--ui-port N (make demo DEMO_ARGS='--ui-port N')"),
        ("127.0.0.1", args.edge_port, "--edge-port N (make demo DEMO_ARGS='--edge-port N')"),
        ("127.0.0.1", MQTT_PORT, "stop what listens there: the Azure IoT device SDK always uses 8883"),
    ):
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError:
                raise CommandError(f"port {port} on {host} is in use; {how}") from None


def _prepare_edge(edge_dir: Path, devices: list[str]):
    """The gateway's certificate (from the folder's CA, made once, so devices keep trusting it), the
    admin key (a file, mode 0600) and the devices' identities; a second run reuses key and identities."""
    from edge_module.auth import DeviceRegistry, connection_string
    from edge_module.certs import write_certs
    from turbofan_core.atomic_file import write_atomically

    certs = write_certs(edge_dir / "certs", GATEWAY_HOST)
    admin_key_file = edge_dir / "admin.key"
    if not admin_key_file.exists():
        write_atomically(admin_key_file, secrets.token_urlsafe(32).encode(), 0o600)
    registry = DeviceRegistry.load(edge_dir / "devices.json")
    for device in devices:
        if registry.get(device) is None:
            registry.create(device)
    lines = "".join(
        connection_string(registry.get(device), "turbofan-hub.local", GATEWAY_HOST) + "\n"
        for device in devices
    )
    devices_file = edge_dir / "connection_strings.txt"
    write_atomically(devices_file, lines.encode(), 0o600)
    return certs, admin_key_file, devices_file


def _start(
    processes: list[_Process], name: str, logs: Path, env: dict[str, str], command: list[str]
) -> _Process:
    process = _Process(name, logs / f"{name}.log", command, env)
    process.start()
    processes.append(process)
    return process


def _wait(process: _Process, url: str) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise CommandError(f"{process.name} exited ({process.popen.returncode}):\n{process.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise CommandError(f"{process.name} did not answer {url} within {START_SECONDS:.0f} s; see {process.log}")


def _follow(home: Home, processes: list[_Process], simulator: _Process, edge_url: str) -> None:
    """Print a line per event until Ctrl-C. The edge module is restarted when it stops (as IoT Edge's
    restart policy `always` does); Dagster stopping ends the demo."""
    seen = _Seen()
    finished = False
    while True:
        for process in processes:
            code = process.popen.poll()
            if code is None:
                continue
            if process is simulator and not finished:
                finished = True
                print(
                    f"simulator finished (exit {code}); the system keeps running: Ctrl-C to stop", flush=True
                )
            elif process.name == "edge":
                process.start()
                print(f"edge module stopped (exit {code}); restarted (pid {process.popen.pid})", flush=True)
            elif process is not simulator:
                raise CommandError(f"{process.name} stopped (exit {code}):\n{process.tail()}")
        for line in _events(home, edge_url, seen):
            print(f"{time.strftime('%H:%M:%S')}  {line}", flush=True)
        time.sleep(POLL_SECONDS)


def _events(home: Home, edge_url: str, seen: _Seen) -> list[str]:
    """What changed since the last look: files landed, rows ingested, models, deployments, serving."""
    from turbofan_assets.sensors import completed_trajectories
    from turbofan_core.storage import LocalStore
    from turbofan_warehouse import registry
    from turbofan_warehouse.schema import has_table
    from turbofan_warehouse.snapshot import NoSnapshot, read_snapshot

    lines = []
    files = sum(1 for _ in LocalStore(home.landing).list_names())
    if files > seen.files:
        lines.append(f"landed      {files - seen.files} new files ({files} in all)")
        seen.files = files
    try:
        with read_snapshot(home.warehouse) as conn:
            ingested = conn.execute("SELECT count(*) FROM telemetry").fetchone()[0]
            completed = completed_trajectories(conn)
            models = (
                conn.execute("SELECT version, stage, reason FROM model_registry ORDER BY version").fetchall()
                if registry.exists(conn)
                else []
            )
            deployed = conn.execute(
                "SELECT model_version, target, result, reason FROM deployments ORDER BY deployed_at"
            ).fetchall() if has_table(conn, "deployments") else []  # fmt: skip
    except NoSnapshot:
        return lines
    if ingested > seen.ingested:
        lines.append(f"ingested    {ingested:,} messages; {completed} engines have failed")
        seen.ingested = ingested
    for version, stage, reason in models:
        if seen.models.get(version) != stage:
            verb = "trained" if version not in seen.models else "now"
            lines.append(f"model v{version} {verb}: {stage}" + (f" ({reason})" if reason else ""))
            seen.models[version] = stage
    for version, target, result, reason in deployed[seen.deployments :]:
        lines.append(f"deployment  v{version} to {target}: {result}" + (f" ({reason})" if reason else ""))
    seen.deployments = len(deployed)
    serving = _serving(edge_url)
    if serving is not None and serving != seen.serving:
        lines.append(f"edge serves model v{serving}: the devices' answers now come from it")
        seen.serving = serving
    return lines


def _serving(edge_url: str) -> str | None:
    try:
        with urllib.request.urlopen(f"{edge_url}/model", timeout=2) as response:
            return json.loads(response.read())["version"]
    except (OSError, ValueError, KeyError):
        return None


def _stop_all(processes: list[_Process]) -> None:
    """SIGTERM each process group, newest first (the simulator, then Dagster, then the edge, whose
    forwarder ships what it holds), and SIGKILL what is still there after a grace period."""
    for process in reversed(processes):
        if process.popen.poll() is None:
            os.killpg(process.popen.pid, signal.SIGTERM)
            try:
                process.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.popen.pid, signal.SIGKILL)
                process.popen.wait()

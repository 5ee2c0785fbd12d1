"""The edge's POST /telemetry path in this process, without HTTP: the batch path against single messages.

`bench_edge.py` measures the real service over loopback, where the event loop also parses HTTP and
the service shares two cores with the client; a full run's batch rate swings by a third within
minutes on a shared machine, so a change to the batch path a few percent deep is lost in it. This
calls the code the service runs for each request (`telemetry_endpoint.answer`: parse, authenticate,
validate, score, record and wait for the group fsync) on the same requests bench_edge.py sends,
with the service's collector settings:

- gateway batches of 500 messages from 100 devices, with the forwarder off, then on;
- the baseline, in the same run: single-message requests through the same function, forwarder on.

With the forwarder on, its thread ships to a local landing folder as the service's does (a file
once `max_records` wait), and a round ends once no more than that waits: the figure is a rate the
forwarder keeps up with. Every answer is checked to have scored each of its messages, outside the
timing. Each figure is the least of several rounds, wall time and the process's CPU time a
message. The last line is JSON: `batch_us`, `batch_forwarding_us`, `single_us` and
`single_over_batch`.

    .venv/bin/python bench/bench_edge_batch.py [--rounds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson
from bench_edge import BATCH, fleet, train_bundle

from edge_module import telemetry_endpoint
from edge_module.model_slot import ModelReference
from edge_module.service import YOUNG_COLLECTION_THRESHOLD, Edge, EdgeConfig
from turbofan_core.home import Home
from turbofan_core.storage import LocalStore

BATCHES_PER_ROUND = 30  # 15,000 messages: the forwarder ships three files a round
SINGLES_PER_ROUND = 1_000
Request = tuple[bytes, dict[str, str]]  # body, headers in lower case (as ASGI gives them)


def split(wire: bytes) -> Request:
    """A request as bench_edge.py puts it on the wire, as the endpoint receives it."""
    head, body = wire.split(b"\r\n\r\n", 1)
    headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
    return body, {name.lower(): value for name, value in headers.items()}


def check_scored(payloads: list[bytes]) -> None:
    """Every message of every answer scored: anything else would time another path."""
    for payload in payloads:
        results = orjson.loads(payload)
        for result in results if isinstance(results, list) else [results]:
            if result["status"] != "scored":
                raise RuntimeError(f"a message was not scored: {result}")


def least_per_message(
    run: Callable[[list[Request]], list[bytes]], rounds: list[list[Request]], messages: int
) -> tuple[float, float]:
    """The least wall and CPU time a message (µs) of `run` over `rounds`, each of `messages` messages."""
    best = (float("inf"), float("inf"))
    for requests in rounds:
        wall, cpu = time.perf_counter(), time.process_time()
        payloads = run(requests)
        best = min(best, ((time.perf_counter() - wall) / messages, (time.process_time() - cpu) / messages))
        check_scored(payloads)
    return best[0] * 1e6, best[1] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    data = Home.from_env().cmapss_dir()
    bundle = train_bundle(data)
    with tempfile.TemporaryDirectory(prefix="bench-edge-batch-") as tmp:
        root = Path(tmp)
        path, _, devices = fleet(root, data, bundle)
        names = list(devices.rows)
        edge = Edge(
            EdgeConfig(
                state_dir=root / "state",
                landing=LocalStore(root / "landing"),
                model=ModelReference("1", str(path), bundle.sha256),
            )
        )
        forwarder = edge.forwarder
        assert forwarder is not None
        loop = asyncio.new_event_loop()

        def answer(requests: list[Request]) -> list[bytes]:
            async def each() -> list[bytes]:
                payloads = []
                for body, headers in requests:
                    status, payload = await telemetry_endpoint.answer(edge, body, headers)
                    if status != 200:
                        raise RuntimeError(f"HTTP {status}: {payload[:200]!r}")
                    payloads.append(payload)
                return payloads

            return loop.run_until_complete(each())

        def answer_and_ship(requests: list[Request]) -> list[bytes]:
            """`answer`, then wait until the forwarder's thread is behind by no more than one file."""
            payloads = answer(requests)
            while edge.store.backlog()[0] > forwarder.max_records:
                time.sleep(0.001)
            return payloads

        def batches(rounds: int) -> list[list[Request]]:
            return [
                [split(r) for r in devices.batches(BATCHES_PER_ROUND, BATCH, names[:100])]
                for _ in range(rounds)
            ]

        def singles(rounds: int) -> list[list[Request]]:
            return [
                [split(r) for r in devices.singles(SINGLES_PER_ROUND, names[100:])] for _ in range(rounds)
            ]

        try:
            check_scored(answer(batches(1)[0] + singles(1)[0]))  # every device's state loaded, code warm
            gc.freeze()  # as the service does once it has started
            gc.set_threshold(YOUNG_COLLECTION_THRESHOLD)
            batch = least_per_message(answer, batches(args.rounds), BATCHES_PER_ROUND * BATCH)
            while forwarder.ship_once(force=True):  # what the rounds without the forwarder left
                pass
            forwarder.start()
            forwarding = least_per_message(answer_and_ship, batches(args.rounds), BATCHES_PER_ROUND * BATCH)
            single = least_per_message(answer_and_ship, singles(args.rounds), SINGLES_PER_ROUND)
        finally:
            forwarder.stop(flush=False)
            edge.store.close()
            loop.close()
    for label, (wall, cpu) in (
        ("batches of 500, forwarder off", batch),
        ("batches of 500, forwarder on", forwarding),
        ("single messages, forwarder on", single),
    ):
        print(f"{label}: {wall:.1f} µs a message ({1e6 / wall:,.0f} msgs/s), {cpu:.1f} µs of CPU")
    print(f"a single message costs {single[0] / forwarding[0]:.1f}x a batch's message")
    print(
        json.dumps(
            {
                "batch_us": round(batch[0], 2),
                "batch_forwarding_us": round(forwarding[0], 2),
                "single_us": round(single[0], 2),
                "single_over_batch": round(single[0] / forwarding[0], 1),
            }
        )
    )


if __name__ == "__main__":
    main()

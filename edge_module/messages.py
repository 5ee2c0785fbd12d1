"""What enters the edge from either transport (REST or the MQTT gateway): one device's message."""

from __future__ import annotations

from typing import NamedTuple


class Incoming(NamedTuple):
    """One device's message as a transport hands it over (`Edge._check` takes the fields as columns, by
    position: their order matters)."""

    device_id: str  # from the device's credential, never from the body
    body: bytes
    properties: dict[str, str]  # application properties
    message_id: str | None
    content_type: str | None = None  # None: application/json (the REST endpoint checked it)
    content_encoding: str | None = None  # None: utf-8
    parsed: object = None  # the body as the transport already parsed it (a JSON object), not parsed again

"""What enters the edge from either transport (REST or the MQTT gateway): devices' messages."""

from __future__ import annotations

from typing import NamedTuple


class Incoming(NamedTuple):
    """One device's message as the MQTT gateway hands it over."""

    device_id: str  # from the device's credential, never from the body
    body: bytes
    properties: dict[str, str]  # application properties
    message_id: str | None
    content_type: str | None = None  # None: application/json
    content_encoding: str | None = None  # None: utf-8
    parsed: object = None  # the body as the transport already parsed it (a JSON object), not parsed again


class Arrivals(NamedTuple):
    """Messages as `Edge.receive` takes them: Incoming's fields, a list each, a message being its place
    in them. A gateway's batch brings hundreds of messages a request, and an object per message cost
    more than the fields it carried."""

    device_ids: list[str]
    bodies: list[bytes]
    properties: list[dict[str, str]]
    message_ids: list[str | None]
    content_types: list[str | None]
    content_encodings: list[str | None]
    parsed: list[object]

    @classmethod
    def of(cls, messages: list[Incoming]) -> Arrivals:
        columns = zip(*messages, strict=True)
        return cls(*(list(column) for column in columns)) if messages else cls([], [], [], [], [], [], [])

"""Devices: replays C-MAPSS engines as IoT devices and writes what they send as IoT Hub capture files."""

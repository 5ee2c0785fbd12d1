"""The IoT Edge module: REST and (later) MQTT gateway, per-device feature state, model hot swap,
store-and-forward to the landing zone. Imports nothing of Dagster or DuckDB."""

"""Simulators that exercise the real interfaces: a station fleet over MQTT (stations.py) and
app users over HTTP (riders.py)."""

"""MQTT side of the backend: the station protocol, the embedded broker with station
authentication and topic ACLs, and the bridge between MQTT and the Station actors."""

"""Running the station protocol on Mosquitto: the ACL that matches the embedded broker's.

docs/station-protocol.md asks an external broker for the same rules the embedded one enforces
(broker/embedded.py): no anonymous clients, a station publishes only to its own `events` and
`status` and reads only its own `commands` and `errors`, the bridge may do everything. For
Mosquitto that is an `acl_file` of `pattern` lines (`%u` is the login's username, which is
the station serial) plus `allow_anonymous false` and a `password_file`.

Station passwords are stored here as argon2 hashes, which Mosquitto's password file cannot
read: a deployment on Mosquitto either writes each station's password into its password
file when it is provisioned (`mosquitto_passwd -b`), or authenticates through a plugin
against this database (e.g. mosquitto-go-auth). The ACL is the same either way.
"""

from __future__ import annotations

from powerbank.broker.protocol import STATION_PUBLISHES, STATION_SUBSCRIBES, Topics

# mosquitto.conf lines a deployment should have besides its listener, password file and ACL.
# - Mosquitto keeps at most `max_queued_messages` (1000 by default) QoS 1 messages for a client
#   beyond its in-flight window and silently drops the rest. The bridge is one client for the
#   whole fleet: a burst (a reconnect storm's re-sends and inventories) larger than that
#   would be dropped before the bridge sees it. Stations re-send what is not acknowledged,
#   so nothing is lost for good, but the storm lasts longer. (0 is documented as "no limit",
#   but Mosquitto 2.0.11 then disconnected our clients: a large number it is.)
# - `set_tcp_nodelay true`: with Nagle's algorithm on, an answer that follows a PUBACK to the
#   same client waits for the client's delayed ACK (about 40 ms on Linux): measured here,
#   station -> bridge -> station took 44 ms instead of 2.
RECOMMENDED_SETTINGS = """\
allow_anonymous false
max_queued_messages 100000
set_tcp_nodelay true
"""


def acl_file_text(topics: Topics, bridge_username: str) -> str:
    """A Mosquitto `acl_file` for the station topic scheme under `topics.root`."""
    lines = [
        "# powerbank station protocol v1 (docs/station-protocol.md, 'Topics and access rules')",
        f"user {bridge_username}",
        f"topic readwrite {topics.root}/#",
        "",
        "# every other login is a station whose username is its serial",
    ]
    lines += [f"pattern write {topics.topic('%u', channel)}" for channel in STATION_PUBLISHES]
    lines += [f"pattern read {topics.topic('%u', channel)}" for channel in STATION_SUBSCRIBES]
    return "\n".join(lines) + "\n"

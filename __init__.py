"""powerbank: a real-time backend for shared power-bank rental networks.

The repository root is this package; see README.md for the architecture.
"""

__version__ = "0.1.0"

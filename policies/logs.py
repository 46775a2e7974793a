"""Loggers: one per module, under Serve's.

Serve's handlers, which write each replica's log file, sit on the "ray.serve" logger. Each
module logs to its own child of it, `ray.serve.mlx_fleet.<module>`: its records reach
Serve's log files as before, and one module's level can be set alone, e.g.
`logging.getLogger("ray.serve.mlx_fleet.deployments.controller").setLevel(logging.DEBUG)`.
"""

from __future__ import annotations

import logging

SERVE_LOGGER = "ray.serve"


def module_logger(module: str) -> logging.Logger:
    """The logger of `module` (its `__name__`)."""
    return logging.getLogger(f"{SERVE_LOGGER}.mlx_fleet.{module}")

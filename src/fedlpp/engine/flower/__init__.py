"""The Flower runtime (flwr 1.41): the only package of fedlpp that imports ``flwr``.

``server_app`` drives the server's loop (``engine/server.py``) over a Flower ``Grid``;
``client_app`` answers with each client's ``client_step`` on its own data; ``simulation``
runs both on Flower's simulation runtime (``fedlpp run --engine flower``); ``deploy`` makes
test certificates and keys and starts validated SuperNodes for a real deployment.

Flower's telemetry, update check and runtime dependency installation are switched off
here, before ``flwr`` is first imported (telemetry reads its variable at import time), and
in the environment of every process fedlpp starts. So are alembic's announcements of its
plugins, which Flower's state store imports, at INFO, with flwr itself.
"""

from __future__ import annotations

import logging
import os

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
os.environ.update(FLOWER_ENV)
logging.getLogger("alembic").setLevel(logging.WARNING)

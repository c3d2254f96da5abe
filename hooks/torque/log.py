"""The Torque hooks' own log: JSON lines in `[torque] log_file` (root's, 0640), else stderr; the job's
stdout/stderr are the owner's and get only what the owner is meant to read."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

LOG = logging.getLogger("vtorque.hooks.torque")


def setup_hook_log(config) -> None:
    from vtorque.shared.logs import JsonFormatter

    try:
        Path(config.torque.log_file).parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(config.torque.log_file)
        os.chmod(config.torque.log_file, 0o640)
    except OSError:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter("vtorque-hook"))
    LOG.handlers[:] = [handler]
    LOG.setLevel(logging.INFO)
    LOG.propagate = False


def hook_log(level: int, msg: str, **fields) -> None:
    from vtorque.shared.logs import log

    log(LOG, level, msg, **fields)

"""The pack's one piece of process state: which warnings were logged already (each is said once per process)."""

from __future__ import annotations

import logging

LOG = logging.getLogger("annealing_guidance")

_WARNED: set[str] = set()


def warn_once(message: str) -> bool:
    """Log ``message`` once per process; True when it was logged now."""
    if message in _WARNED:
        return False
    _WARNED.add(message)
    LOG.warning("[Annealing Guidance] %s", message)  # the pack, then the message (which names the method)
    return True

"""Quiet start-up of an embedded (local) Ray: only messages that concern the user."""
from __future__ import annotations

import logging
import os
import sys

__all__ = ["embedded_ray_env"]

# Ray enables token authentication for a new local cluster and warns that it did; authentication stays on
TOKEN_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"


def embedded_ray_env() -> None:
    """Call before ``ray.init`` of an embedded local Ray: silences Ray's notice that it enabled token
    authentication (its default, unchanged) and, unless stdout and stderr are both terminals, drops the colour
    codes around worker log prefixes (``RAY_COLOR_PREFIX=0``): Ray prints a worker's stdout lines to the
    driver's stdout, so ``scd demo > log`` in a terminal must not colour them. A value the user set is kept."""
    logging.getLogger(TOKEN_SETUP_LOGGER).setLevel(logging.ERROR)
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")

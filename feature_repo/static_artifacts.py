# Warm-up hook of `feast serve`: Feast 0.67's feature server imports this file from the
# repo directory and calls load_artifacts(app) once in every worker, before the worker
# takes requests. It pins thread pools (QARM_SERVING_THREADS, default 1) and loads the
# bundle this repo serves, so no request pays the load. Failures are logged and the
# worker still starts (each cold row then reports the problem in qarm_error). `feast
# apply` imports this file too: it defines a function and nothing else.

import logging
from pathlib import Path

REPO = Path(__file__).resolve().parent


def load_artifacts(app):
    from qarm_features.feast.serving import serving_setup

    log = logging.getLogger("qarm.static_artifacts")
    try:
        info = serving_setup(REPO)
    except Exception as exc:  # noqa: BLE001 - never keep a worker from starting
        log.error("QARM warm-up failed: %s", exc)
        return
    app.state.qarm = info
    log.info("QARM cold-item path ready: %s", info)

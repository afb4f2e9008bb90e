"""Keep Flower and Ray from contacting outside servers (applied by every hcc-fl entry point)."""

from __future__ import annotations

import os

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_DEDUP_LOGS": "0",
    "TQDM_DISABLE": "1",
    "PYTHONUNBUFFERED": "1",
}


def offline_environ() -> None:
    """Apply :data:`OFFLINE_ENV` to this process and the processes it starts."""
    for key, value in OFFLINE_ENV.items():
        if key == "TQDM_DISABLE":
            continue  # our own progress bars stay; the child processes get it via OFFLINE_ENV
        os.environ[key] = value

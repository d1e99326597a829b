"""The only layer that knows Prefect and MLflow. Importing it sets offline defaults.

Prefect and MLflow read their settings from the environment at import time, so the
defaults are applied here, before either is imported: state in the project folder,
no telemetry, a generous ephemeral-server start-up timeout for a loaded 2-core box.
Anything already set in the environment wins.
"""

from flows.settings import apply_offline_defaults

apply_offline_defaults()

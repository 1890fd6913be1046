"""The Dagster definitions of this project, built from the environment (and `.env`) and the
entities file: what `dagster dev`, `dagster asset materialize -m dataverse_assets` and the
`dg` commands load (`[tool.dagster]` in pyproject.toml). The builders are defs.definitions'."""

from dataverse_assets.config import load_settings
from dataverse_assets.defs.alerts import load_alert_settings
from dataverse_assets.defs.definitions import build_definitions

# load_settings loads `.env` first (arguments evaluate in order), so the alert variables may
# live there too.
defs = build_definitions(load_settings(), alerts=load_alert_settings())

"""dataverse-assets: a Dagster project keeping a SQLite mirror of Dataverse tables.

`defs` is importable from the package so `dagster ... -m dataverse_assets` finds it.
"""

from dataverse_assets.definitions import defs

__all__ = ["defs"]

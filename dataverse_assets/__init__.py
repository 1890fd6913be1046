"""dataverse-assets: a Dagster project keeping a SQLite mirror of Dataverse tables.

`defs` is importable from the package so `dagster ... -m dataverse_assets` finds it. It is built
on first access rather than at import, so the CLI (`dataverse-assets doctor` above all) can
report a bad configuration as a message instead of failing while importing the package.
"""


def __getattr__(name: str):
    if name == "defs":
        from dataverse_assets.definitions import defs

        return defs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "defs"])


__all__ = ["defs"]

"""dataverse-assets: a Dagster project keeping a SQLite mirror of Dataverse tables.

`defs` (the Definitions) is importable from the package so `dagster ... -m dataverse_assets`
finds it. It is built on first access rather than at import, so the CLI (`dataverse-assets
doctor` above all) can report a bad configuration as a message instead of failing while
importing the package. Code should import it from `dataverse_assets.definitions`: the package
attribute shares its name with the `defs/` folder (the Dagster layer), and is the Definitions
only when nothing imported that folder first.
"""


def __getattr__(name: str):
    if name == "defs":
        # The lazy loader (one of the two imports inside a function the layer contract
        # allows). Importing the definitions imports the `defs/` folder, which binds the
        # package attribute `defs` to that folder; the Definitions replace it.
        from dataverse_assets.definitions import defs

        globals()["defs"] = defs
        return defs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "defs"])


__all__ = ["defs"]

"""The one identifier quoter of the store (db and staging_store both need it, and db imports
staging_store)."""


def quote_identifier(name: str) -> str:
    """Quote any string as a SQLite identifier: hostile names never break a statement."""
    if "\x00" in name:
        raise ValueError(f"identifier contains a NUL character: {name!r}")
    return '"' + name.replace('"', '""') + '"'

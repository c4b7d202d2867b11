"""Stores. Services are typed against the role protocols in :mod:`marketpipe.store.base`; the one
place a concrete store is chosen and opened is :func:`open_store`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from marketpipe.core.config import Config
    from marketpipe.store.base import Store


def open_store(config: Config, *, read_only: bool = False, create: bool = True) -> Store:
    """Open the store the configuration names (``config.store_target()``): a ``postgresql://`` URL
    opens the PostgreSQL store, anything else the DuckDB file (``duckdb://`` or a plain path),
    creating or migrating its tables unless ``read_only``. Raises ``StoreError`` when it cannot be
    opened, and, with ``create=False`` (what a command that only reads passes), when there is no
    store there yet."""
    if config.store_is_server():
        from marketpipe.store.postgres import PostgresStore  # imported here: DuckDB users need no driver

        return PostgresStore(config.store_target(), read_only=read_only, create=create)
    from marketpipe.store.duckdb import DuckDBStore  # imported here: reading the protocols needs no DuckDB

    return DuckDBStore(
        config.store_path(), read_only=read_only, create=create, read_cache_bytes=config.store.read_cache_mb << 20
    )

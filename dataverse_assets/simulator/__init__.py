"""A local Dataverse Web API simulator: realistic org data, paging, change tracking, auth."""

from .app import create_app
from .model import (
    SIMULATOR_CLIENT_ID,
    SIMULATOR_CLIENT_SECRET,
    SIMULATOR_TENANT_ID,
    DataverseSimulator,
    SimAttribute,
    SimEntity,
    SimStats,
    entity_spec_for,
)
from .odata import ODataQueryError
from .server import serve_on_loopback

__all__ = [
    "SIMULATOR_CLIENT_ID",
    "SIMULATOR_CLIENT_SECRET",
    "SIMULATOR_TENANT_ID",
    "DataverseSimulator",
    "ODataQueryError",
    "SimAttribute",
    "SimEntity",
    "SimStats",
    "create_app",
    "entity_spec_for",
    "serve_on_loopback",
]

"""A local Dataverse Web API simulator: realistic org data, paging, change tracking, auth."""

from .app import create_app
from .faults import FAULT_KINDS, Fault, FaultPlan, SimulatedConnectionReset
from .model import (
    SIMULATOR_CLIENT_ID,
    SIMULATOR_CLIENT_SECRET,
    SIMULATOR_TENANT_ID,
    DataverseSimulator,
    SimAttribute,
    SimEntity,
    SimRequest,
    SimStats,
    entity_spec_for,
)
from .odata import ODataQueryError
from .protection import ServiceProtectionLimits
from .server import serve_on_loopback

__all__ = [
    "FAULT_KINDS",
    "SIMULATOR_CLIENT_ID",
    "SIMULATOR_CLIENT_SECRET",
    "SIMULATOR_TENANT_ID",
    "DataverseSimulator",
    "Fault",
    "FaultPlan",
    "ODataQueryError",
    "ServiceProtectionLimits",
    "SimAttribute",
    "SimEntity",
    "SimRequest",
    "SimStats",
    "SimulatedConnectionReset",
    "create_app",
    "entity_spec_for",
    "serve_on_loopback",
]

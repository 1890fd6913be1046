"""A local Dataverse Web API simulator: realistic org data, paging, change tracking, auth.

The names below are loaded on first use (PEP 562): importing the package, or
`dataverse_assets.simulator.identity` for the simulator's client id and secret, does not load
the ASGI app and its data model. A run that talks to a simulator served by another process
(`dataverse-assets simulator`) never needs them (~0.2 s of imports per run).
"""

import importlib

_SUBMODULE_OF = {
    "create_app": "app",
    "FAULT_KINDS": "faults",
    "Fault": "faults",
    "FaultPlan": "faults",
    "SimulatedConnectionReset": "faults",
    "LatencyModel": "latency",
    "SIMULATOR_CLIENT_ID": "identity",
    "SIMULATOR_CLIENT_SECRET": "identity",
    "SIMULATOR_TENANT_ID": "identity",
    "DataverseSimulator": "model",
    "SimAttribute": "model",
    "SimEntity": "model",
    "SimRequest": "model",
    "SimStats": "model",
    "entity_spec_for": "model",
    "ODataQueryError": "odata",
    "ServiceProtectionLimits": "protection",
    "serve_on_loopback": "server",
}

__all__ = sorted(_SUBMODULE_OF)


def __getattr__(name: str):
    submodule = _SUBMODULE_OF.get(name)
    if submodule is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{submodule}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

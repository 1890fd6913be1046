"""The simulator's app registration: what a client needs to talk to it, importable without
loading the simulator itself (a source pointed at a simulator served elsewhere needs only this).
"""

SIMULATOR_CLIENT_ID = "simulator-client"
# A public placeholder for local development and tests; it protects nothing.
SIMULATOR_CLIENT_SECRET = "simulator-secret"
SIMULATOR_TENANT_ID = "8f3c2a71-5d4e-4b6a-9c1f-2e7d9a0b4c63"

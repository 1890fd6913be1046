"""Operator commands over a mirror: the command line (cli), doctor, report, status, fixture
recording, rebuild from the archive, and the plan view."""

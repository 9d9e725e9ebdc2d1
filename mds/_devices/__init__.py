"""Devices: identity, discovery by kind, and the manager that places instances."""

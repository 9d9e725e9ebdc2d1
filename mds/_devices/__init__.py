"""Devices: identity now; discovery and placement come with the device manager."""

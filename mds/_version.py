"""The installed version of mds."""

__version__ = "0.1.0"

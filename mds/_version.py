"""The installed version of mds."""

__version__ = "0.3.0.dev0"

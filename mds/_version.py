"""The installed version of mds."""

__version__ = "0.4.0.dev0"

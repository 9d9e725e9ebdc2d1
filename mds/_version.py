"""The installed version of mds."""

__version__ = "0.5.0.dev0"

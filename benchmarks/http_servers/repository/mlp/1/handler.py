"""The benchmark MLP as a repository model (mds_mlp.py is on the server's PYTHONPATH)."""

from mds_mlp import MLP

__all__ = ["MLP"]

"""Batch serving: a servable over a whole data set (see :mod:`mds.batch`)."""

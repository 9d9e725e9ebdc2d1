"""The batching path between ``preprocess`` and ``infer``."""

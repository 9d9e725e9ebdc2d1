"""Pipelines: graphs of models and functions served like one model."""

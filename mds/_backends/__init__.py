"""Ready-made handlers for model frameworks; each imports its framework lazily."""

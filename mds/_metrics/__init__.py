"""mds's numbers as metric families, and their sharing between worker processes."""

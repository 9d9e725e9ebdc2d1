"""Queue workers: a broker's messages served through a runtime (see ``mds.workers``)."""

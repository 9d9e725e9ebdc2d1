"""The same handlers on Ray: Ray Serve replicas online, Ray Data actors offline.

When one machine is not enough, mds does not grow a cluster of its own; the
runtime runs inside Ray's. Online, each Ray Serve replica runs its own
runtime, serving through mds's batcher, with mds's routes as its ingress::

    def build() -> mds.Runtime:            # in a module the replicas can import
        runtime = mds.Runtime()
        runtime.add_model("scorer", Scorer, config)
        return runtime

    serve.run(mds.ray.application(build, num_replicas=2))

Offline, a Ray Data job serves each block through actors that each hold a
runtime, and records a row that fails instead of failing the job::

    scored = mds.ray.map_dataset(ray.data.read_parquet(path), build, "scorer")

Needs Ray (``pip install "mds-serving[ray]"``). See the "Scaling out with
Ray" page of the docs. Added in 0.5.
"""

from __future__ import annotations

from ._ray.data import ServeBatches as ServeBatches
from ._ray.data import map_dataset as map_dataset
from ._ray.serve import Replica as Replica
from ._ray.serve import application as application
from ._ray.serve import call as call

__all__ = ["Replica", "ServeBatches", "application", "call", "map_dataset"]

# Reprs and tracebacks show the public path, not the private module.
for _name in __all__:
    globals()[_name].__module__ = __name__
del _name

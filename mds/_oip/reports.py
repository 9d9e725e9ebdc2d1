"""What the protocol reports of a runtime: model metadata, Triton's model config, statistics.

Plain values in the shapes Triton gives them over HTTP (JSON); the gRPC
service parses the same values into its protobuf messages, whose fields
have the same names.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._config import VersionPolicy
from .._errors import ModelNotFound
from .._pipeline.running import PipelineRuntime
from .._runtime import Runtime
from .._servable import Servable
from .._status import Histogram, ModelStatistics, PipelineStatistics
from .._tensors import TensorSpec
from .call import tensor_metadata
from .protocol import ModelMetadata, datatype_of

__all__ = ["EXTENSIONS", "extensions", "metadata", "model_config", "statistics"]

#: The protocol extensions mds serves over every transport.
EXTENSIONS = (
    "classification",
    "model_configuration",
    "parameters",
    "schedule_policy",
    "statistics",
)


def extensions(repository: bool) -> tuple[str, ...]:
    """What the server metadata lists: :data:`EXTENSIONS`, and ``model_repository`` with one."""
    return (*EXTENSIONS, "model_repository") if repository else EXTENSIONS


def metadata(target: Servable) -> ModelMetadata:
    """A model's or pipeline's metadata: versions, platform, inputs, outputs."""
    inputs, outputs = target.signature() or ({}, {})
    return ModelMetadata(
        name=target.name,
        versions=list(target.versions),
        platform=target.platform,
        inputs=[tensor_metadata(spec) for spec in inputs.values()],
        outputs=[tensor_metadata(spec) for spec in outputs.values()],
    )


def model_config(runtime: Runtime, name: str, version: str | None = None) -> dict[str, Any]:
    """Triton's model configuration for a model or pipeline, from what mds knows of it.

    Inputs and outputs are per row, as with Triton's ``max_batch_size`` above
    0: clients add the batch axis. A pipeline is an ``ensemble`` with no
    batching of its own.

    Raises:
        ModelNotFound: no such model, pipeline or version.
    """
    target = runtime.servable(name, version)
    if name in runtime.pipelines:
        pipeline = runtime.pipeline(name)
        return _config_of(pipeline, max_batch_size=0)
    model = runtime.model(name, version)
    config = model.config
    batching = config.batching
    found = _config_of(target, max_batch_size=batching.max_batch_size)
    found["version_policy"] = _policy(runtime.versions(name).policy)
    found["dynamic_batching"] = {
        "preferred_batch_size": list(batching.preferred_batch_sizes),
        "max_queue_delay_microseconds": round(batching.max_queue_delay * 1e6),
        "priority_levels": batching.priority_levels,
        "default_priority_level": batching.default_priority + 1,
        "default_queue_policy": {
            "max_queue_size": batching.max_queue_size,
            "default_timeout_microseconds": round((config.timeout or 0) * 1e6),
            "allow_timeout_override": True,
        },
    }
    sequences = config.sequences
    if sequences is not None:  # Triton's form: its own batcher (clients read it to send ids)
        strategy = "direct" if sequences.pinned else "oldest"
        found["sequence_batching"] = {
            "max_sequence_idle_microseconds": round(sequences.idle_timeout * 1e6),
            strategy: {
                "max_candidate_sequences": sequences.max_sequences,
                "preferred_batch_size": list(batching.preferred_batch_sizes),
                "max_queue_delay_microseconds": round(batching.max_queue_delay * 1e6),
            },
        }
        del found["dynamic_batching"]
    devices = (config.devices,) if isinstance(config.devices, str) else config.devices
    gpu = any(d.startswith(("cuda", "gpu")) for d in devices)
    found["instance_group"] = [
        {
            "name": f"{model.name}_0",
            "kind": "KIND_GPU" if gpu else "KIND_CPU",
            "count": config.instances,
        }
    ]
    found["parameters"] = {
        str(k): {"string_value": str(v)} for k, v in sorted(config.parameters.items())
    }
    return found


def _policy(policy: VersionPolicy) -> dict[str, Any]:
    """A version policy as Triton's config gives it (its versions are numbers)."""
    if policy.all:
        return {"all": {}}
    if policy.specific is not None:
        return {"specific": {"versions": [int(v) for v in policy.specific if str(v).isdigit()]}}
    return {"latest": {"num_versions": policy.latest or 1}}


def _config_of(target: Servable | PipelineRuntime, *, max_batch_size: int) -> dict[str, Any]:
    inputs, outputs = target.signature() or ({}, {})
    return {
        "name": target.name,
        "platform": target.platform,
        "backend": "mds",
        "max_batch_size": max_batch_size,
        "input": [_tensor(spec) for spec in inputs.values()],
        "output": [_tensor(spec) for spec in outputs.values()],
    }


#: Protocol datatype -> Triton's model config ``data_type``.
_CONFIG_TYPES = {"BYTES": "TYPE_STRING"}


def _tensor(spec: TensorSpec) -> dict[str, Any]:
    try:
        datatype = datatype_of(np.dtype(spec.dtype)) or "BYTES"
    except TypeError:
        datatype = "BYTES"
    dims = [d if isinstance(d, int) else -1 for d in spec.shape]
    return {
        "name": spec.name,
        "data_type": _CONFIG_TYPES.get(datatype, f"TYPE_{datatype}"),
        "dims": dims,
    }


def statistics(
    runtime: Runtime, name: str | None = None, version: str | None = None
) -> dict[str, Any]:
    """The statistics extension's reply: ``{"model_stats": [...]}``, Triton's shape.

    Every loaded version of every model, and every pipeline; or those of
    ``name`` (at ``version``).

    Raises:
        ModelNotFound: no such model, pipeline or version.
    """
    found: list[dict[str, Any]] = []
    if name is None:
        for model in sorted(runtime.models):
            found += [
                _model_stats(m.statistics()) for m in runtime.versions(model).runtimes.values()
            ]
        found += [_pipeline_stats(p.statistics()) for _, p in sorted(runtime.pipelines.items())]
        return {"model_stats": found}
    if name in runtime.pipelines:
        runtime.servable(name, version)  # the version, checked
        return {"model_stats": [_pipeline_stats(runtime.pipeline(name).statistics())]}
    if name not in runtime.models:
        runtime.servable(name)  # raises, naming what there is
        raise ModelNotFound(f"no model named {name!r}")  # pragma: no cover
    versions = runtime.versions(name)
    chosen = [versions.runtime(version)] if version is not None else versions.runtimes.values()
    return {"model_stats": [_model_stats(m.statistics()) for m in chosen]}


def _duration(count: int, seconds: float) -> dict[str, int]:
    return {"count": count, "ns": round(seconds * 1e9)}


def _timed(histogram: Histogram) -> dict[str, int]:
    return _duration(histogram.count, histogram.sum)


def _model_stats(stats: ModelStatistics) -> dict[str, Any]:
    """One version's statistics: mds's counters in Triton's fields.

    ``compute_infer`` is per batch (mds times batches, not requests), and
    ``batch_stats`` count batches by size with no durations.
    """
    h = stats.histograms
    none = _duration(0, 0.0)
    return {
        "name": stats.name,
        "version": stats.version,
        "last_inference": 0,
        "inference_count": stats.batched_items,
        "execution_count": stats.batches,
        "inference_stats": {
            "success": _timed(h.request),
            "fail": _duration(stats.failed + stats.rejected, 0.0),
            "queue": _timed(h.queue_wait),
            "compute_input": _timed(h.preprocess),
            "compute_infer": _timed(h.infer),
            "compute_output": _timed(h.postprocess),
            "cache_hit": none,
            "cache_miss": none,
        },
        "batch_stats": [
            {
                "batch_size": size,
                "compute_input": none,
                "compute_infer": _duration(count, 0.0),
                "compute_output": none,
            }
            for size, count in sorted(stats.batch_sizes.items())
        ],
    }


def _pipeline_stats(stats: PipelineStatistics) -> dict[str, Any]:
    none = _duration(0, 0.0)
    return {
        "name": stats.name,
        "version": stats.version,
        "last_inference": 0,
        "inference_count": stats.completed,
        "execution_count": stats.completed,
        "inference_stats": {
            "success": _timed(stats.request),
            "fail": _duration(stats.failed + stats.rejected, 0.0),
            "queue": none,
            "compute_input": none,
            "compute_infer": none,
            "compute_output": none,
            "cache_hit": none,
            "cache_miss": none,
        },
        "batch_stats": [],
    }

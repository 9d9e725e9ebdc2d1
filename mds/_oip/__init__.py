"""The Open Inference Protocol (KServe V2, as Triton serves it), apart from any transport.

What a protocol request means (its tensors checked against the model, rows,
parameters, requested outputs) and what mds reports through it (metadata,
model config, statistics) are worked out here once; the HTTP routes and the
gRPC service each only decode and encode their own wire form.
"""

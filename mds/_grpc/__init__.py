"""The Open Inference Protocol over gRPC: Triton's ``inference.GRPCInferenceService``.

What a request means is worked out in :mod:`mds._oip`; here protobuf
messages are decoded into it and responses encoded back (:mod:`.codec`),
and each RPC is answered (:mod:`.service`, :mod:`.stream`). The messages
are those tritonclient generates: a second copy of the ``inference``
protos in one process would clash with them.
"""

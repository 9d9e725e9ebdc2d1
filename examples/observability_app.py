"""An app operators can watch: Prometheus metrics, traces, logs and a status page.

Run it:   python examples/observability_app.py          (PORT=8000 by default)
Then:     curl localhost:8000/metrics                    (Prometheus' text format)
          open http://127.0.0.1:8000/status              (the status page)
          curl -X POST localhost:8000/models/mlp/infer -H 'content-type: application/json' \
               -H 'traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01' \
               -d "$(python -c 'print([0.5] * 16)')"
Spans print to the console as JSON (OpenTelemetry's console exporter), and
log lines carry the model, version and batch they are about.
"""

from __future__ import annotations

import logging
import os

from fastapi import FastAPI
from mlp_model import CONFIG, MLPClassifier
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

import mds
import mds.fastapi

# Traces: the app configures OpenTelemetry (mds configures nothing). In
# production, an OTLP exporter to a collector instead of the console.
provider = TracerProvider(resource=Resource.create({"service.name": "mlp-example"}))
provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
trace.set_tracer_provider(provider)

# Logs: the app's own format, with mds's fields where a record has them.
handler = logging.StreamHandler()
handler.setFormatter(
    logging.Formatter(
        "%(levelname)s %(name)s %(message)s [model=%(mds_model)s version=%(mds_version)s]",
        defaults={"mds_model": "-", "mds_version": "-"},
    )
)
logging.getLogger("mds").addHandler(handler)
logging.getLogger("mds").setLevel(logging.INFO)

runtime = mds.Runtime()
runtime.add_model("mlp", MLPClassifier, CONFIG)

app = FastAPI()
# /metrics for Prometheus, /status for people; the rest as in fastapi_app.py.
mds.fastapi.add_routes(app, runtime, metrics=True, status_page=True)


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))

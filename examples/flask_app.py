"""Serve a torch model from your own Flask app, with ``mds.serve_sync``.

Run it:   python examples/flask_app.py            (PORT=5000 by default)
Try it:   curl -X POST localhost:5000/classify -H 'content-type: application/json' \
               -d "{\"features\": $(python -c 'print([0.5] * 16)')}"
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, request
from mlp_model import CONFIG, MLPClassifier

import mds

runtime = mds.Runtime()
runtime.add_model("mlp", MLPClassifier, CONFIG)
# Runs the models in mds's background event loop; every view's call goes there,
# whatever thread the WSGI server runs it in. Stopped (drained) at exit.
runtime.start_sync()

app = Flask(__name__)


@app.post("/classify")
def classify() -> Any:
    body = request.get_json(silent=True) or {}
    try:
        return mds.serve_sync("mlp", body.get("features"))
    except mds.RequestError as exc:
        return {"detail": str(exc)}, 400
    except mds.Unavailable as exc:
        return {"detail": str(exc)}, 503
    except mds.DeadlineExceeded as exc:
        return {"detail": str(exc)}, 504


@app.get("/health")
def health() -> Any:
    report = runtime.health_sync()
    return {"ready": report.ready}, 200 if report.ready else 503


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "5000")), threaded=True)

"""A Flask app with its own views, plus the routes mds adds for every model.

Run it:   python examples/flask_app.py            (PORT=5000 by default)
Try it:   python examples/client.py http://127.0.0.1:5000
          curl -X POST localhost:5000/classify -H 'content-type: application/json' \
               -d "{\"features\": $(python -c 'print([0.5] * 16)')}"
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, request
from mlp_model import CONFIG, MLPClassifier, MLPRanked

import mds
import mds.flask

runtime = mds.Runtime()
runtime.add_model("mlp", MLPClassifier, CONFIG)  # mds's JSON and the protocol, one model
runtime.add_model("mlp-ranked", MLPRanked, CONFIG)  # its postprocess yields: it streams

app = Flask(__name__)


@app.post("/classify")
def classify() -> Any:
    # The app's own view, calling the model directly. mds's errors answer
    # for themselves: a bad request is a 400, a full queue a 429, ...
    body = request.get_json(silent=True)
    features = body.get("features") if isinstance(body, dict) else None
    return mds.serve_sync("mlp", features)


# Adds /health/*, /models/*, /statistics and /v2/* for every model, and mds's
# error handlers for the app's own views. The models load in mds's background
# event loop (readiness says when they are ready) and drain at exit.
mds.flask.add_routes(app, runtime)


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "5000")), threaded=True)

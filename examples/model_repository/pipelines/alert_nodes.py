"""The churn-alert pipeline's business logic (imported relative to the pipeline file)."""

from typing import Any


def alert(output: dict[str, Any], request: list[float]) -> dict[str, Any]:
    return {**output, "alert": output["risk"] > 0.8}

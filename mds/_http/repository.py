"""The protocol's model repository extension: index, load, unload; no framework.

The routes change what the server runs, so an adapter adds them only when
given a repository, behind the app's own auth.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .._errors import DecodeError, InvalidInput
from .._repository.repository import ModelRepository
from .service import JSON, Reply

__all__ = ["REPOSITORY_ROUTES", "Repository"]

#: (method, path, route) of the repository extension, as Triton serves it.
REPOSITORY_ROUTES: tuple[tuple[str, str, str], ...] = (
    ("POST", "/v2/repository/index", "repository_index"),
    ("POST", "/v2/repository/models/{name}/load", "repository_load"),
    ("POST", "/v2/repository/models/{name}/unload", "repository_unload"),
)


class _Index(msgspec.Struct, forbid_unknown_fields=True):
    ready: bool = False


class _Parameters(msgspec.Struct):
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)


_encoder = msgspec.json.Encoder()


class Repository:
    """The repository routes' behaviour for one :class:`ModelRepository`."""

    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository

    def index(self, body: bytes) -> Reply:
        """The index: ``{"ready": true}`` lists only the ready versions."""
        ready = _decode(body, _Index, "the index request").ready
        return Reply(200, _encoder.encode(self.repository.index(ready=ready)), JSON)

    def load_config(self, body: bytes) -> str | None:
        """The ``config`` a load request carries, if any; refuses what mds cannot do."""
        parameters = _decode(body, _Parameters, "the load request").parameters
        config: str | None = None
        for key, value in parameters.items():
            if key == "config":
                if not isinstance(value, str):
                    raise InvalidInput(
                        "parameter 'config' must be a string holding the model's config as "
                        f"JSON, not {type(value).__name__}"
                    )
                config = value
            elif key.startswith("file:"):
                raise InvalidInput(
                    f"parameter {key!r}: mds does not take model files over HTTP; deploy them "
                    f"into the repository folder ({self.repository.path})"
                )
            else:
                raise InvalidInput(f"unrecognized load parameter {key!r}; mds takes 'config'")
        return config

    def check_unload(self, body: bytes) -> None:
        """Check an unload request (``unload_dependents`` is accepted: pipelines need none)."""
        parameters = _decode(body, _Parameters, "the unload request").parameters
        for key, value in parameters.items():
            if key != "unload_dependents" or not isinstance(value, bool):
                raise InvalidInput(f"unrecognized unload parameter {key!r}={value!r}")

    def done(self, name: str) -> Reply:
        """The reply to a load or unload: the model's versions as the index lists them."""
        entries = [e for e in self.repository.index() if e["name"] == name]
        return Reply(200, _encoder.encode(entries), JSON)


def _decode(body: bytes, kind: type[Any], what: str) -> Any:
    if not body.strip():
        return kind()
    try:
        return msgspec.json.decode(body, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DecodeError(f"{what} is not valid: {exc}") from None

"""A servable's requests from named tensors, and its responses as named tensors.

What every transport that speaks in named tensors shares (the Open Inference
Protocol, batch jobs over columnar files): ``from_tensors`` and
``to_tensors`` with their errors in mds's terms, and the naming of a
response that is one unnamed value.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ._errors import InferenceError, InvalidInput, MdsError, describe
from ._servable import Servable
from ._tensors import InputCheck, Signature

__all__ = ["input_check", "named_outputs", "output_namer", "request_from_tensors"]


_checks: dict[int, tuple[Signature, InputCheck]] = {}


def input_check(signature: Signature) -> InputCheck:
    """The input check for ``signature``, made once (a model's signature is made once a start)."""
    found = _checks.get(id(signature))
    if found is None or found[0] is not signature:
        if len(_checks) > 256:  # models restarted many times: forget the old ones
            _checks.clear()
        found = _checks[id(signature)] = (signature, InputCheck(signature[0]))
    return found[1]


def request_from_tensors(target: Servable, tensors: dict[str, Any]) -> Any:
    """The request ``tensors`` (one row's) make, by the target's ``from_tensors``.

    Raises:
        InvalidInput: ``from_tensors`` failed with an error that is not mds's.
    """
    try:
        return target.from_tensors(tensors)
    except MdsError:
        raise
    except Exception as exc:
        raise InvalidInput(f"the request's tensors make no request: {describe(exc)}") from exc


def named_outputs(target: Servable, response: Any) -> dict[str, Any]:
    """One response's output tensors by name (see :meth:`ModelHandler.to_tensors`).

    A single unnamed value is named after the target's one declared output,
    else ``output0``.

    Raises:
        InferenceError: ``to_tensors`` failed with an error that is not mds's.
    """
    return output_namer(target)(response)


def output_namer(target: Servable) -> Callable[[Any], dict[str, Any]]:
    """:func:`named_outputs` for many responses of ``target``, its signature looked up once."""
    signature = target.signature()
    single = next(iter(signature[1])) if signature is not None and len(signature[1]) == 1 else None
    to_tensors = target.to_tensors

    def named(response: Any) -> dict[str, Any]:
        try:
            tensors = to_tensors(response)
        except MdsError:
            raise
        except Exception as exc:
            raise InferenceError(f"to_tensors failed: {describe(exc)}") from exc
        if isinstance(tensors, dict) or isinstance(tensors, Mapping):  # dict: no ABC check
            return {str(k): v for k, v in tensors.items()}
        return {single or "output0": tensors}

    return named

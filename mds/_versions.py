"""A model's versions side by side, and which of them answers each request.

A runtime keeps one :class:`ModelVersions` per model name. Requests that
name no version go by its traffic split (one version takes all of it unless
told otherwise); a request may name one. Swapping a version is one change
of these tables, made on the runtime's loop: a request picks its version
and enters that version's queue with no await in between, so it is either
queued on the old version (which drains it) or sent to the new one.
"""

from __future__ import annotations

import math
import random
from bisect import bisect
from collections import Counter, OrderedDict
from collections.abc import Coroutine, Mapping
from threading import get_ident as _get_ident
from types import MappingProxyType
from typing import Any

from ._bridge import Home
from ._config import ModelConfig, VersionPolicy, version_key
from ._errors import ConfigError, MdsError, ModelNotFound, NotReady
from ._handler import ModelState
from ._model import ModelRuntime
from ._request import request_context
from ._sequences import Ends
from ._servable import Serving
from ._statistics import retired_statistics, summed
from ._status import CallTrace, ModelHealth, ModelStatistics, VersionStatus
from ._tensors import Signature

__all__ = ["ModelVersions"]

_random = random.random

_Table = tuple[
    "ModelRuntime[Any, Any] | None",
    tuple[float, ...],
    tuple["ModelRuntime[Any, Any]", ...],
    "ModelRuntime[Any, Any] | None",
]


class _Delegating(Serving[Any, Any, CallTrace, ModelHealth]):
    """What a model's servables read from the version that would answer now."""

    name: str

    def _runtime(self) -> ModelRuntime[Any, Any]:
        """The version that serves the next request."""
        raise NotImplementedError

    def _current(self) -> ModelRuntime[Any, Any]:
        """The version this stands for (the default one, for a model)."""
        return self._runtime()

    def _looked_up(self) -> ModelRuntime[Any, Any] | None:
        try:
            return self._current()
        except MdsError:
            return None

    @property
    def version(self) -> str:
        """The version that answers requests that name none."""
        return self._current().version

    @property
    def config(self) -> ModelConfig:
        """The answering version's config."""
        return self._current().config

    @property
    def platform(self) -> str:
        found = self._looked_up()
        return found.platform if found is not None else "python"

    @property
    def state(self) -> ModelState:
        found = self._looked_up()
        return found.state if found is not None else ModelState.STOPPED

    @property
    def ready(self) -> bool:
        found = self._looked_up()
        return found is not None and found.ready

    @property
    def failure(self) -> str | None:
        found = self._looked_up()
        return found.failure if found is not None else None

    @property
    def streams(self) -> bool:
        found = self._looked_up()
        return found is not None and found.streams

    @property
    def queue_capacity(self) -> int:
        return self._current().queue_capacity

    @property
    def stateful(self) -> bool:
        found = self._looked_up()
        return found is not None and found.stateful

    def signature(self) -> Signature | None:
        found = self._looked_up()
        return found.signature() if found is not None else None

    def from_tensors(self, tensors: dict[str, Any]) -> Any:
        return self._current().from_tensors(tensors)

    def to_tensors(self, response: Any) -> Any:
        return self._current().to_tensors(response)

    def statistics(self) -> ModelStatistics:
        """The answering version's counters."""
        return self._current().statistics()

    def serve(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: bool = False,
        sequence_id: int | str | None = None,
        sequence_start: bool = False,
        sequence_end: bool = False,
    ) -> Coroutine[Any, Any, Any]:
        # As Serving.serve, with the version picked at home first: the
        # pick and the version's enqueue happen with no await in between.
        home = self._home
        if sequence_id is not None or sequence_start or sequence_end:
            flags = (sequence_id, sequence_start, sequence_end)
            return home.call(self._serve_step, flags, request, timeout, priority, trace, False)
        if home.thread == _get_ident() or home.portal is None:
            try:
                runtime = self._runtime()
            except MdsError as exc:
                return _raising(exc)
            return runtime._serve(request, timeout, priority, trace, False)
        return home.call(self._serve, request, timeout, priority, trace, False)

    async def _serve(
        self, request: Any, timeout: float | None, priority: int | None, trace: bool, stream: bool
    ) -> Any:
        return await self._runtime()._serve(request, timeout, priority, trace, stream)

    async def _serve_many(
        self, requests: list[Any], timeout: float | None, priority: int | None
    ) -> list[Any]:
        return await self._runtime()._serve_many(requests, timeout, priority)

    async def _health(self) -> ModelHealth:
        try:
            runtime = self._current()
        except MdsError as exc:
            return ModelHealth(
                name=self.name, version="", state=ModelState.STOPPED, ready=False, reason=str(exc)
            )
        return await runtime._health()


class ModelVersions(_Delegating):
    """A model's loaded versions, and which of them answers each request.

    What :meth:`Runtime.servable` returns for a model: serving through it
    picks the version by the traffic split (one version, the newest
    loaded, takes all of it unless :meth:`Runtime.set_traffic` says
    otherwise). A request pinned to a version goes through
    :meth:`Runtime.servable` with ``version``. Change it through the
    runtime: :meth:`Runtime.load_model`, :meth:`Runtime.unload_model`,
    :meth:`Runtime.set_traffic`, :meth:`Runtime.rollback`.

    Attributes:
        name: the model's name.
        policy: which versions stay loaded.

    Example:
        >>> clf = runtime.servable("classifier")
        >>> clf.versions, clf.traffic
        (('1', '2'), {'2': 1.0})

    Added in 0.4.
    """

    def __init__(self, name: str, home: Home, policy: VersionPolicy | None = None) -> None:
        self.name = name
        self.policy: VersionPolicy = policy if policy is not None else VersionPolicy()
        self._home = home
        self._loaded: dict[str, ModelRuntime[Any, Any]] = {}
        self._weights: dict[str, float] = {}
        # (the one version taking all traffic or None, bounds, choices, the default):
        # one tuple, replaced whole, so a thread reading it sees one routing or the next.
        self._table: _Table = (None, (), (), None)
        self._history: list[dict[str, float]] = []
        self._gone: dict[str, VersionStatus] = {}  # failed loads, unloaded versions
        self._load_failures: Counter[str] = Counter()  # loads that failed, by version
        # The counters of each version's runtimes that were reloaded or unloaded.
        # Each version's reloaded or unloaded runtimes' counters: those folded
        # once idle, and those live.
        self._retired: dict[str, tuple[ModelStatistics | None, tuple[Any, ...]]] = {}
        self._reload_failed: dict[str, str] = {}  # loaded versions whose reload failed
        self._draining: list[ModelRuntime[Any, Any]] = []  # retired, with live sequences
        #: Why sequences ended, whichever version ended them (each version's runtime shares it).
        self.sequence_ends: Ends = OrderedDict()

    def __repr__(self) -> str:
        return (
            f"<ModelVersions {self.name!r} versions={list(self.versions)} traffic={self.traffic}>"
        )

    # -- what callers read --------------------------------------------------

    @property
    def versions(self) -> tuple[str, ...]:
        """Every loaded version, oldest first."""
        return tuple(sorted(self._loaded, key=version_key))

    @property
    def traffic(self) -> dict[str, float]:
        """Each version that takes requests naming none, with its share (summing to 1)."""
        weights = dict(self._weights)
        total = sum(weights.values())
        return {v: w / total for v, w in sorted(weights.items())} if total else {}

    @property
    def runtimes(self) -> Mapping[str, ModelRuntime[Any, Any]]:
        """Each loaded version's :class:`ModelRuntime`, by version (read-only)."""
        return MappingProxyType(dict(sorted(self._loaded.items(), key=lambda i: version_key(i[0]))))

    def runtime(self, version: str | None = None) -> ModelRuntime[Any, Any]:
        """The :class:`ModelRuntime` of ``version``; of the default version if ``None``.

        Raises:
            ModelNotFound: that version is not loaded.
        """
        if version is None:
            return self._current()
        found = self._loaded.get(version)
        if found is None:
            raise self._no_version(version)
        return found

    def status(self) -> list[VersionStatus]:
        """Every version this runtime has loaded, failed to load or unloaded, oldest first."""
        found = dict(self._gone)
        for version, runtime in list(self._loaded.items()):
            found[version] = VersionStatus(
                name=self.name,
                version=version,
                state=runtime.state,
                reason=runtime.failure or self._reload_failed.get(version),
                default=version in self._weights,
                on_demand=runtime.on_demand,
            )
        return [found[v] for v in sorted(found, key=version_key)]

    def choose(self) -> _Pinned:
        """The version that answers the next request, picked by the traffic split.

        The servable returned keeps that choice, so a transport can say
        which version answered; should the version be unloaded before the
        request is served, the request goes by the split again.
        """
        return _Pinned(self, self._runtime().version, soft=True)

    def pinned(self, version: str) -> _Pinned:
        """A servable that always serves with ``version``.

        Raises:
            ModelNotFound: that version is not loaded.
        """
        self.runtime(version)
        return _Pinned(self, version, soft=False)

    def add_context(self, error: MdsError) -> MdsError:
        return error.add_context(model=self.name)

    # -- routing ------------------------------------------------------------

    def _runtime(self) -> ModelRuntime[Any, Any]:
        single, bounds, choices, _ = self._table
        if single is not None:
            chosen = single
        elif not choices:
            raise self._none_loaded()
        else:
            chosen = choices[bisect(bounds, _random() * bounds[-1])]
        if chosen.config.sequences is None:
            return chosen
        return self._holding(chosen)

    def _holding(self, chosen: ModelRuntime[Any, Any]) -> ModelRuntime[Any, Any]:
        """The version that holds the sequence of the step being served, else ``chosen``.

        A sequence's steps all go where it started, whatever the traffic
        split says since; to a version being retired too, while it drains.
        """
        sequence_id = request_context().sequence_id
        if sequence_id is None:
            return chosen
        for runtime in (*self._loaded.values(), *self._draining):
            sequences = runtime._sequences
            if sequences is None or not sequences.holds(sequence_id):
                continue
            if runtime.ready or sequences.draining():  # it takes the step (a start: refuses it)
                return runtime
        return chosen

    def _current(self) -> ModelRuntime[Any, Any]:
        found = self._table[3]
        if found is None:
            raise self._none_loaded()
        return found

    def _none_loaded(self) -> NotReady:
        return NotReady(
            "not ready: no version of it is loaded; load one (Runtime.load_model)",
            model=self.name,
        )

    def _no_version(self, version: str) -> ModelNotFound:
        have = ", ".join(repr(v) for v in self.versions) or "none"
        return ModelNotFound(
            f"no version {version!r} is loaded; loaded versions: {have}", model=self.name
        )

    # -- changes, made by the runtime on its loop ------------------------------

    def _kept(self, extra: str | None = None, policy: VersionPolicy | None = None) -> set[str]:
        """The versions the policy and the traffic keep (with ``extra`` loaded too)."""
        versions = set(self._loaded) | ({extra} if extra is not None else set())
        return (policy or self.policy).keeps(versions) | set(self._weights)

    def _install(
        self, model: ModelRuntime[Any, Any], *, default: bool
    ) -> ModelRuntime[Any, Any] | None:
        """Make ``model`` its version's runtime; with ``default``, give it all traffic.

        Returns the runtime it replaced, if any.
        """
        version = model.version
        replaced = self._loaded.get(version)
        self._loaded[version] = model
        self._gone.pop(version, None)
        self._reload_failed.pop(version, None)
        if replaced is not None:
            self._retire(replaced, swapped=True)
        if default or not self._weights:
            self._route({version: 1.0})
        else:
            self._reroute()
        return replaced

    def _route(self, weights: Mapping[str, float], *, remember: bool = True) -> None:
        """Send requests that name no version by ``weights`` (versions loaded)."""
        for version, weight in weights.items():
            if version not in self._loaded:
                raise self._no_version(version)
            if not (weight >= 0 and math.isfinite(weight)):
                raise ConfigError(
                    f"traffic for version {version!r}: {weight!r} is not a finite share >= 0"
                )
        weights = {v: float(w) for v, w in weights.items() if w > 0}
        if not weights:
            raise ConfigError("traffic: at least one version needs a share above 0")
        if remember and self._weights and weights != self._weights:
            self._history.append(self._weights)
            del self._history[:-16]
        self._weights = weights
        self._reroute()

    def _previous(self) -> dict[str, float] | None:
        """The last traffic split before this one whose versions are all still loaded."""
        while self._history:
            weights = self._history.pop()
            if all(v in self._loaded for v in weights):
                return weights
        return None

    def _remove(
        self, version: str, *, why: str = "unloaded", swapped: bool = False
    ) -> ModelRuntime[Any, Any]:
        """Take ``version`` out of routing; its runtime, for the caller to stop.

        ``swapped``: another version replaces it (its live sequences end so).
        """
        runtime = self._loaded.pop(version)
        self._weights.pop(version, None)
        self._reload_failed.pop(version, None)
        self._retire(runtime, swapped=swapped)
        self._gone[version] = VersionStatus(
            name=self.name, version=version, state=ModelState.STOPPED, reason=why
        )
        if not self._weights and self._loaded:
            self._weights = {max(self._loaded, key=version_key): 1.0}
        self._reroute()
        return runtime

    def _failed(self, version: str, reason: str) -> None:
        """Record that a load of ``version`` failed (a loaded copy goes on serving)."""
        self._load_failures[version] += 1
        if version in self._loaded:
            self._reload_failed[version] = f"a reload failed (this copy serves on): {reason}"
        else:
            self._gone[version] = VersionStatus(
                name=self.name, version=version, state=ModelState.FAILED, reason=reason
            )

    def _prune(self) -> list[ModelRuntime[Any, Any]]:
        """Take out the versions neither the policy nor the traffic keeps; theirs, to stop."""
        keep = self._kept()
        return [
            self._remove(v, why=f"not kept by the version policy ({self.policy})", swapped=True)
            for v in list(self._loaded)
            if v not in keep
        ]

    def _reroute(self) -> None:
        weights = self._weights
        choices = tuple(self._loaded[v] for v in sorted(weights, key=version_key))
        total = 0.0
        bounds = []
        for runtime in choices:
            total += weights[runtime.version]
            bounds.append(total)
        default = None
        if weights:
            best = max(weights, key=lambda v: (weights[v], version_key(v)))
            default = self._loaded[best]
        single = choices[0] if len(choices) == 1 else None
        self._table = (single, tuple(bounds), choices, default)

    def _retire(self, runtime: ModelRuntime[Any, Any], *, swapped: bool = False) -> None:
        """``runtime`` serves no new request: one already picked goes to what serves now.

        Its counters stay with the version (they count the requests it still
        finishes), so that metrics of the version never go down.
        """
        version = runtime.version
        frozen, live = self._retired.get(version, (None, ()))
        live = (*live, (runtime._counts, runtime._batch_stats))
        if len(live) > _RETIRED_KEPT:
            # Those that finished every request count no more: fold them into one.
            idle = [pair for pair in live if not pair[0].in_flight]
            if idle:
                older = [retired_statistics(self.name, version, *pair) for pair in idle]
                frozen = summed(frozen, older)
                live = tuple(pair for pair in live if pair[0].in_flight)
        # One tuple, replaced whole: a scrape from another thread reads it at once.
        self._retired[version] = (frozen, live)

        async def forward(
            request: Any, timeout: float | None, priority: int | None, trace: bool, stream: bool
        ) -> Any:
            successor = self._loaded.get(runtime.version) or self._runtime()
            return await successor._serve(request, timeout, priority, trace, stream)

        runtime._successor = forward
        sequences = runtime._sequences
        self._draining = [old for old in self._draining if old._sequences is not None]
        if sequences is not None:
            sequences.swapped = swapped
            if sequences.config.on_stop == "drain":  # its sequences' steps still go to it
                self._draining.append(runtime)


#: Retired runtimes' live counters a version keeps before it folds the idle ones.
_RETIRED_KEPT = 4


class _Pinned(_Delegating):
    """One version of a model, looked up at each call (a reload swaps what answers)."""

    def __init__(self, versions: ModelVersions, version: str, *, soft: bool) -> None:
        self.name = versions.name
        self._versions = versions
        self._home = versions._home
        self._version = version
        self._soft = soft

    def __repr__(self) -> str:
        return f"<ModelVersions {self.name!r} version={self._version!r}>"

    @property
    def version(self) -> str:
        return self._version

    @property
    def versions(self) -> tuple[str, ...]:
        return self._versions.versions

    def add_context(self, error: MdsError) -> MdsError:
        return error.add_context(model=self.name, version=self._version)

    def choose(self) -> _Pinned:
        return self

    def _runtime(self) -> ModelRuntime[Any, Any]:
        versions = self._versions
        found = versions._loaded.get(self._version)
        if found is not None:
            return found
        if not self._soft:
            raise versions._no_version(self._version)
        found = versions._runtime()  # unloaded since it was chosen: choose again
        self._version = found.version
        return found


async def _raising(error: BaseException) -> Any:
    raise error

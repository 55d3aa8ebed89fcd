"""Which executors this agent runs: found through the ``muster.executors`` entry points."""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib.metadata import EntryPoint, entry_points

from muster.agent.executors.base import Executor, ExecutorSettings, ExecutorUnavailable
from muster.errors import ConfigError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "muster.executors"


class ExecutorRegistry:
    """Task kind -> executor. The kinds become the agent's capabilities in Hello."""

    def __init__(self, executors: Iterable[Executor] = ()) -> None:
        self._by_kind: dict[str, Executor] = {}
        for executor in executors:
            self.register(executor)

    def register(self, executor: Executor) -> None:
        if not isinstance(executor, Executor):
            raise ConfigError(f"{executor!r} is not an executor (needs `kind` and `async run`)")
        kind = executor.kind
        if not isinstance(kind, str) or not kind:
            raise ConfigError(f"executor {executor!r} has no kind")
        if kind in self._by_kind:
            raise ConfigError(f"two executors claim the task kind {kind!r}")
        self._by_kind[kind] = executor

    def get(self, kind: str) -> Executor | None:
        return self._by_kind.get(kind)

    @property
    def kinds(self) -> list[str]:
        """The registered kinds, sorted (stable Hello capabilities)."""
        return sorted(self._by_kind)

    def __contains__(self, kind: object) -> bool:
        return kind in self._by_kind

    def __iter__(self) -> Iterator[Executor]:
        return iter(self._by_kind.values())

    def __len__(self) -> int:
        return len(self._by_kind)

    async def aclose(self) -> None:
        """Let executors that hold connections (an HTTP client pool) close them."""
        for executor in self._by_kind.values():
            close = getattr(executor, "aclose", None)
            if close is None:
                continue
            try:
                await close()
            except Exception:
                log.warning("closing executor %r failed", executor.kind, exc_info=True)

    @classmethod
    def discover(
        cls,
        names: Sequence[str] | None = None,
        *,
        settings: ExecutorSettings | None = None,
        group: str = ENTRY_POINT_GROUP,
    ) -> ExecutorRegistry:
        """Load the entry points named ``names`` (all of them when None).

        Each entry point names a class (or factory) called with no arguments,
        or with the :class:`ExecutorSettings` when it takes one. The entry
        point's name is how ``--executors`` selects it; the executor's own
        ``kind`` is what the server matches tasks against. Loading all, an
        executor that raises :class:`ExecutorUnavailable` (no API key, no
        binary) is skipped and so not advertised; named, it stops the start.
        """
        settings = settings if settings is not None else ExecutorSettings()
        found = {ep.name: ep for ep in entry_points(group=group)}
        if names is None:
            selected = sorted(found)
        else:
            unknown = [name for name in names if name not in found]
            if unknown:
                available = ", ".join(sorted(found)) or "none"
                raise ConfigError(
                    f"unknown executor(s): {', '.join(unknown)} (available: {available})"
                )
            selected = list(dict.fromkeys(names))
        registry = cls()
        for name in selected:
            try:
                executor = _instantiate(
                    found[name], dataclasses.replace(settings, selected=names is not None)
                )
            except ExecutorUnavailable as err:
                if names is not None:
                    raise ConfigError(f"executor {name!r} cannot run here: {err}") from err
                log.info("executor %s not loaded: %s", name, err)
                continue
            registry.register(executor)
        if not registry:
            raise ConfigError(f"no executors found in the {group!r} entry-point group")
        log.debug("executors: %s", ", ".join(registry.kinds))
        return registry


def _instantiate(ep: EntryPoint, settings: ExecutorSettings) -> Executor:
    try:
        factory = ep.load()
        executor = factory(settings) if _takes_settings(factory) else factory()
    except ExecutorUnavailable:
        raise
    except Exception as err:
        raise ConfigError(f"cannot load executor {ep.name!r} ({ep.value}): {err}") from err
    if not isinstance(executor, Executor):
        raise ConfigError(f"executor {ep.name!r} ({ep.value}) lacks `kind` or `run`")
    return executor


def _takes_settings(factory: Callable[..., object]) -> bool:
    """Whether the factory accepts one positional argument (the settings)."""
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return any(p.kind in positional or p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)

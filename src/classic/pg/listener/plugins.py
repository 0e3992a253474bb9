"""The plugin host: one pluggy manager per listener, entry-point discovery, listing.

Installed distributions become plugins by declaring an entry point in the
``classic_pg_listener`` group::

    [project.entry-points.classic_pg_listener]
    jsonl = "classic_pg_listener_jsonl"

The entry point's name is the plugin's name: the id used to block it and the
name shown in listings and error messages.

Environment switches, read when a listener is constructed:

``CLASSIC_PG_LISTENER_DISABLE_PLUGIN_AUTOLOAD``
    any non-empty value: load no entry point (plugins passed in code still
    register).
``CLASSIC_PG_LISTENER_LOAD_PLUGINS``
    unset: load every entry point; empty: none; ``a,b``: only these names.
``CLASSIC_PG_LISTENER_BLOCKED_PLUGINS``
    ``a,b``: never load or register these names.
``CLASSIC_PG_LISTENER_TRACE_PLUGINS``
    any non-empty value: log every hook call (level DEBUG).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Protocol

import pluggy

from . import hookspecs
from .errors import PluginError
from .hookspecs import PROJECT_NAME, Callback

logger = logging.getLogger("classic.pg.listener")

ENV_DISABLE_AUTOLOAD = "CLASSIC_PG_LISTENER_DISABLE_PLUGIN_AUTOLOAD"
ENV_LOAD_PLUGINS = "CLASSIC_PG_LISTENER_LOAD_PLUGINS"
ENV_BLOCKED_PLUGINS = "CLASSIC_PG_LISTENER_BLOCKED_PLUGINS"
ENV_TRACE_PLUGINS = "CLASSIC_PG_LISTENER_TRACE_PLUGINS"

HOOK_NAMES = tuple(name for name in vars(hookspecs) if name.startswith("listener_"))
"""Every hook the listener calls, in the order the hookspecs declare them."""


@dataclass(frozen=True)
class PluginInfo:
    """What ``Listener.plugins`` and ``pg-listener plugins`` show of a plugin."""

    name: str
    """The entry-point name, or the name given to ``register_plugin``."""
    distribution: str | None
    """The distribution that declared the entry point; ``None`` for code plugins."""
    version: str | None
    """That distribution's version."""
    hooks: tuple[str, ...]
    """The hooks the plugin implements."""
    channels: tuple[str, ...]
    """The channels it registered callbacks for (``listener_register_callbacks``)."""


@dataclass(frozen=True)
class DiscoveredPlugin:
    """An entry point of the group, loaded or not: what discovery found."""

    name: str
    distribution: str | None
    version: str | None
    plugin: object | None
    """The loaded object, ``None`` when loading failed."""
    error: PluginError | None
    """Why loading failed, ``None`` when it worked."""


class Requests(Protocol):
    """What the host needs of a listener: the calls a plugin registers through.

    They return ``concurrent.futures`` futures for both listeners, so that a
    plugin's ``register`` behaves the same in a thread and in asyncio.
    """

    def _add(self, callback: Callback, channel: str) -> Future[None]: ...

    def _remove(self, callback: Callback, channel: str) -> Future[None]: ...

    def _new_future(self) -> Future[None]: ...


def get_plugin_manager() -> pluggy.PluginManager:
    """A pluggy manager that knows our hookspecs and nothing else."""
    manager = pluggy.PluginManager(PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    return manager


def _names(value: str) -> set[str]:
    return {name.strip() for name in value.split(",") if name.strip()}


def autoload_enabled(autoload: bool | None) -> bool:
    """The constructor argument if given, else what the environment says."""
    if autoload is not None:
        return autoload
    return not os.environ.get(ENV_DISABLE_AUTOLOAD)


def blocked_names(blocked: Iterable[str] = ()) -> set[str]:
    """Names blocked by argument or by ``CLASSIC_PG_LISTENER_BLOCKED_PLUGINS``."""
    return set(blocked) | _names(os.environ.get(ENV_BLOCKED_PLUGINS, ""))


def _describe(entry_point: EntryPoint) -> tuple[str | None, str | None, str]:
    dist = entry_point.dist
    name = dist.metadata["Name"] if dist is not None else None
    version = dist.version if dist is not None else None
    where = f"entry point {entry_point.name!r} ({entry_point.value})"
    if name is not None:
        where += f" of distribution {name} {version}"
    return name, version, where


def discover(blocked: Iterable[str] = ()) -> Iterator[DiscoveredPlugin]:
    """Load the entry points of the ``classic_pg_listener`` group.

    Blocked names and names left out by ``CLASSIC_PG_LISTENER_LOAD_PLUGINS``
    are skipped. A failure to import is returned, not raised, so that a
    listing can show every plugin; ``Listener`` raises it.
    """
    skip = blocked_names(blocked)
    only = os.environ.get(ENV_LOAD_PLUGINS)
    wanted = None if only is None else _names(only)
    seen: dict[str, str] = {}
    for entry_point in entry_points(group=PROJECT_NAME):
        if entry_point.name in skip or (
            wanted is not None and entry_point.name not in wanted
        ):
            continue
        dist, version, where = _describe(entry_point)
        if entry_point.name in seen:
            error = PluginError(
                f"{where} reuses the plugin name of {seen[entry_point.name]}:"
                " entry-point names must be unique"
            )
            yield DiscoveredPlugin(entry_point.name, dist, version, None, error)
            continue
        seen[entry_point.name] = where
        try:
            plugin = entry_point.load()
        except Exception as ex:
            error = PluginError(f"{where} failed to load: {type(ex).__name__}: {ex}")
            error.__cause__ = ex
            yield DiscoveredPlugin(entry_point.name, dist, version, None, error)
        else:
            yield DiscoveredPlugin(entry_point.name, dist, version, plugin, None)


def _all_of(futures: list[Future[None]], combined: Future[None]) -> Future[None]:
    """One future for several: done when all are, failing with the first error."""
    remaining = len(futures)
    lock = threading.Lock()

    def one_done(_: Future[None]) -> None:
        nonlocal remaining
        with lock:
            remaining -= 1
            if remaining:
                return
        if not combined.set_running_or_notify_cancel():
            return  # cancelled by its user
        for future in futures:
            if not future.cancelled() and (error := future.exception()) is not None:
                combined.set_exception(error)
                return
        combined.set_result(None)

    if not futures and combined.set_running_or_notify_cancel():
        combined.set_result(None)
    for future in futures:
        future.add_done_callback(one_done)
    return combined


class PluginHost:
    """A listener's plugins, and the calls to their hooks.

    Hooks are called one implementation at a time rather than through
    pluggy's ``_multicall``, which stops at the first implementation that
    raises: here a raising plugin is logged and the others still run. The
    implementations of each hook are looked up when plugins change, never
    per call, so that a per-notification hook nobody implements costs one
    ``None`` test on the hot path.
    """

    def __init__(
        self, listener: object, requests: Requests, blocked: Iterable[str] = ()
    ):
        self._listener = listener
        self._requests = requests
        self._manager = get_plugin_manager()
        self._blocked = blocked_names(blocked)
        for name in self._blocked:
            self._manager.set_blocked(name)
        self._lock = threading.RLock()
        self._origin: dict[str, tuple[str | None, str | None]] = {}
        self._contributed: dict[str, list[tuple[Callback, str]]] = {}
        self._impls: dict[str, tuple[pluggy.HookImpl, ...]] = {}
        self._trace = bool(os.environ.get(ENV_TRACE_PLUGINS))
        self._refresh()

    def load_entry_points(self) -> None:
        """Register every discovered plugin; the first failure raises ``PluginError``.

        Blocked names are skipped before import, as pytest's ``-p no:name``
        does: blocking is how a user gets past a plugin that breaks on import.
        """
        for found in discover(self._blocked):
            if found.error is not None:
                raise found.error
            self.register(
                found.plugin,
                found.name,
                found.distribution,
                found.version,
                entry_point=True,
            )

    def register(
        self,
        plugin: object,
        name: str | None = None,
        distribution: str | None = None,
        version: str | None = None,
        *,
        entry_point: bool = False,
    ) -> str | None:
        """Register ``plugin`` and let it contribute its callbacks.

        Returns the plugin's name, or ``None`` when that name is blocked.
        """
        where = f"plugin {name or plugin!r}"
        if entry_point:
            where = f"plugin of entry point {name!r}"
        if distribution is not None:
            where += f" of distribution {distribution} {version}"
        with self._lock:
            try:
                registered = self._manager.register(plugin, name)
            except pluggy.PluginValidationError as ex:
                raise PluginError(f"{where} is invalid: {ex}") from ex
            except ValueError as ex:
                raise PluginError(f"{where} cannot be registered: {ex}") from ex
            if registered is None:
                logger.info("%s is blocked: not registered", where)
                return None
            try:
                self._check(plugin, where)
            except PluginError:
                self._manager.unregister(plugin)
                raise
            self._origin[registered] = (distribution, version)
            self._contributed[registered] = []
            self._refresh()
        self._call_one(
            "listener_register_callbacks",
            plugin,
            listener=self._listener,
            register=partial(self._register_callback, registered),
        )
        return registered

    def _check(self, plugin: object, where: str) -> None:
        # check_pending() catches a hookimpl whose name matches no hookspec,
        # typically a typo that would otherwise be silently never called.
        try:
            self._manager.check_pending()
        except pluggy.PluginValidationError as ex:
            raise PluginError(f"{where} is invalid: {ex}") from ex
        for caller in self._manager.get_hookcallers(plugin) or ():
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and (impl.hookwrapper or impl.wrapper):
                    raise PluginError(
                        f"{where}: {impl.function.__name__} is a hook wrapper;"
                        " the listener calls each implementation on its own and"
                        " supports no wrappers"
                    )

    def unregister(self, name: str) -> Future[None]:
        """Remove a plugin, then the callbacks it contributed.

        The future resolves once every callback is removed, or raises the
        first error of those removals.
        """
        with self._lock:
            plugin = self._manager.get_plugin(name)
            if plugin is None:
                raise PluginError(f"no plugin named {name!r} is registered")
            self._call_one("listener_unregistered", plugin, listener=self._listener)
            self._manager.unregister(plugin)
            contributed = self._contributed.pop(name, [])
            self._origin.pop(name, None)
            self._refresh()
        return _all_of(
            [self._requests._remove(cb, ch) for cb, ch in contributed],
            self._requests._new_future(),
        )

    def _register_callback(
        self, plugin_name: str, callback: Callback, channel: str
    ) -> Future[None]:
        future = self._requests._add(callback, channel)
        with self._lock:
            self._contributed.setdefault(plugin_name, []).append((callback, channel))
        return future

    def infos(self) -> list[PluginInfo]:
        with self._lock:
            result = []
            for name, plugin in self._manager.list_name_plugin():
                if plugin is None:
                    continue  # pluggy lists a blocked name with no plugin
                callers = self._manager.get_hookcallers(plugin) or []
                dist, version = self._origin.get(name, (None, None))
                channels = dict.fromkeys(
                    ch for _, ch in self._contributed.get(name, [])
                )
                result.append(
                    PluginInfo(
                        name=name,
                        distribution=dist,
                        version=version,
                        hooks=tuple(sorted(caller.name for caller in callers)),
                        channels=tuple(channels),
                    )
                )
            return result

    def _refresh(self) -> None:
        hook = self._manager.hook
        self._impls = {
            # pluggy calls the last registered first: keep its order.
            name: tuple(reversed(getattr(hook, name).get_hookimpls()))
            for name in HOOK_NAMES
        }

    def caller(self, hook_name: str) -> Callable[..., None] | None:
        """A function calling the hook, or ``None`` when nobody implements it.

        For the per-notification hooks: the serving thread asks once per
        batch, and the function binds the implementations of that moment,
        sparing each call the lookups (a third of a no-op hook's cost).
        """
        impls = self._impls[hook_name]
        return self._bind(hook_name, impls) if impls else None

    def call(self, hook_name: str, **kwargs: Any) -> None:
        """Call every implementation of a hook; log, never raise, their errors."""
        self._bind(hook_name, self._impls[hook_name])(**kwargs)

    def _call_one(self, hook_name: str, plugin: object, **kwargs: Any) -> None:
        impls = [impl for impl in self._impls[hook_name] if impl.plugin is plugin]
        self._bind(hook_name, impls)(**kwargs)

    def _bind(
        self, hook_name: str, impls: Iterable[pluggy.HookImpl]
    ) -> Callable[..., None]:
        plan = [(impl.function, impl.argnames, impl.plugin_name) for impl in impls]
        trace = self._trace

        def call(**kwargs: Any) -> None:
            for function, argnames, plugin_name in plan:
                if trace:
                    logger.debug(
                        "hook %s -> plugin %r %r", hook_name, plugin_name, kwargs
                    )
                try:
                    function(*[kwargs[arg] for arg in argnames])
                except Exception:
                    logger.exception(
                        "plugin %r raised in hook %s", plugin_name, hook_name
                    )

        return call

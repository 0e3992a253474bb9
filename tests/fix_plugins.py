"""Installed plugin distributions, faked on disk for the discovery tests.

``importlib.metadata`` finds a distribution through a ``*.dist-info``
directory on ``sys.path``; writing one (METADATA, entry_points.txt) next to
the plugin's module under ``tmp_path`` is all ``pip install`` would leave
behind, so discovery runs exactly as for a real install, with no pip and no
network. Each distribution gets names no other test uses: a module imported
once stays in ``sys.modules``, and entry-point names must be unique.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from classic.pg.listener import plugins
from classic.pg.listener.hookspecs import PROJECT_NAME


@dataclass(frozen=True)
class FakeDist:
    """What ``install_plugin`` wrote: the names a test asserts on."""

    name: str
    """The entry-point name, which is the plugin's name."""
    distribution: str
    version: str
    module: str


InstallPlugin = Callable[..., FakeDist]


@pytest.fixture
def install_plugin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[InstallPlugin]:
    """Install fake distributions declaring a ``classic_pg_listener`` entry point.

    ``install_plugin(source)`` writes ``source`` as the plugin module and
    returns its names. Autoload is turned back on for the test, and
    ``CLASSIC_PG_LISTENER_LOAD_PLUGINS`` is set to the fake plugins installed
    so far, so that real plugins installed in the environment (CI installs
    ``plugins/*``) do not join in; a test about that variable sets it itself.
    """
    site = tmp_path / "site-packages"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv(plugins.ENV_DISABLE_AUTOLOAD, raising=False)
    monkeypatch.delenv(plugins.ENV_BLOCKED_PLUGINS, raising=False)
    monkeypatch.delenv(plugins.ENV_TRACE_PLUGINS, raising=False)
    installed: list[FakeDist] = []

    def install(
        source: str = "",
        *,
        value: str | None = None,
        version: str = "1.2.3",
        name: str | None = None,
    ) -> FakeDist:
        token = uuid.uuid4().hex[:10]
        dist = FakeDist(
            name=name or f"fake_{token}",
            distribution=f"classic-pg-listener-fake-{token}",
            version=version,
            module=f"classic_pg_listener_fake_{token}",
        )
        (site / f"{dist.module}.py").write_text(textwrap.dedent(source))
        info = site / f"{dist.distribution.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist.distribution}\nVersion: {version}\n"
        )
        target = (value or "{module}").format(module=dist.module)
        (info / "entry_points.txt").write_text(
            f"[{PROJECT_NAME}]\n{dist.name} = {target}\n"
        )
        # Finders cache directory listings (metadata's too): look afresh.
        importlib.invalidate_caches()
        installed.append(dist)
        monkeypatch.setenv(
            plugins.ENV_LOAD_PLUGINS, ",".join(d.name for d in installed)
        )
        return dist

    yield install
    for dist in installed:
        sys.modules.pop(dist.module, None)

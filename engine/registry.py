"""The one generic name -> factory registry, used for architectures, backends, schedules and policies."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(ValueError):
    """A registry was asked for a name nothing registered."""


class Registry(Generic[T]):
    """Maps a name to a factory (usually a class) and builds instances with keyword options.

    ``entry_point_group`` names the ``importlib.metadata`` group whose entries are imported the
    first time the registry is searched, so installed packages can add entries without an import.
    """

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._factories: dict[str, Callable[..., T]] = {}
        self._entry_points_loaded = entry_point_group is None

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: ``@registry.register("name")`` on a class or factory function."""

        def add(factory: Callable[..., T]) -> Callable[..., T]:
            existing = self._factories.get(name)
            if existing is not None and existing is not factory:
                raise ValueError(f"{self.kind} {name!r} is already registered by {existing!r}")
            self._factories[name] = factory
            return factory

        return add

    def factory(self, name: str) -> Callable[..., T]:
        self._load_entry_points()
        try:
            return self._factories[name]
        except KeyError:
            known = ", ".join(self.available()) or "none"
            hint = " (or load one with --plugin MODULE)" if self.entry_point_group else ""
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {known}{hint}") from None

    def get(self, name: str, **options: Any) -> T:
        """Build the entry ``name`` with ``options``; unknown or missing options are a clear error."""
        factory = self.factory(name)
        signature = _options(factory)
        if signature is not None:
            accepted, required = signature
            allowed = ", ".join(accepted) or "none"
            unknown = [option for option in options if option not in accepted]
            if unknown:
                raise ValueError(
                    f"{self.kind} {name!r} has no option {', '.join(unknown)}; options: {allowed}"
                )
            missing = [option for option in required if option not in options]
            if missing:
                raise ValueError(f"{self.kind} {name!r} needs {', '.join(missing)}; options: {allowed}")
        return factory(**options)

    def options(self, name: str) -> list[str]:
        """The keyword options the entry ``name`` takes (empty when it takes any)."""
        signature = _options(self.factory(name))
        return [] if signature is None else signature[0]

    def available(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._factories)

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        return name in self._factories

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for entry in entry_points(group=self.entry_point_group):
            entry.load()


def _options(factory: Callable[..., Any]) -> tuple[list[str], list[str]] | None:
    """The keyword options ``factory`` takes and those it requires; None when it takes any (``**kwargs``)."""
    try:
        parameters = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return [p.name for p in named], [p.name for p in named if p.default is p.empty]


def load_plugin(name: str) -> None:
    """Import a user's module so that its ``@registry.register`` decorators run.

    ``name`` is a dotted module name on the import path, or the path of a ``.py`` file.
    """
    path = Path(name)
    if name.endswith(".py") or os.sep in name:
        if not path.is_file():
            raise ValueError(f"plugin file {name} not found; give a .py file or an importable module name")
        spec = importlib.util.spec_from_file_location(f"engine_plugin_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        _run_plugin(name, lambda: spec.loader.exec_module(module))
        return
    _run_plugin(name, lambda: importlib.import_module(name))


def _run_plugin(name: str, load: Callable[[], object]) -> None:
    try:
        load()
    except ModuleNotFoundError as error:
        if error.name == name or name.startswith(f"{error.name}."):
            raise ValueError(
                f"plugin module {name!r} not found; give an importable module name (a package installed, "
                "or a module on PYTHONPATH) or the path of a .py file"
            ) from None
        raise ValueError(
            f"plugin {name!r} needs the module {error.name!r}, which is not installed: install it, or fix "
            "the plugin's import"
        ) from None
    except Exception as error:  # the plugin is the user's code: any failure to import is theirs to see
        where = ""
        if isinstance(error, SyntaxError):
            where = f" (line {error.lineno})"
        raise ValueError(
            f"plugin {name!r} failed to import: {type(error).__name__}: {error}{where}"
        ) from None

"""Packages whose ``__init__`` imports far more than proxyd uses, loaded lazily (PEP 562).

Why: some dependencies' package ``__init__`` files import every module they
have (kubernetes_asyncio: ~770 model classes, ~30 MiB; pyroute2: IPDB, NDB
with sqlite, wireless, plan9..., ~20 MiB), and Python runs a package's
``__init__`` before any of its submodules, so importing the one submodule
proxyd needs pays for all of it, as RSS, for the daemon's life.

``install(root, packages)`` puts stand-ins for those packages into
``sys.modules`` before anything imports them. A stand-in is a real package
(its ``__path__`` is the installed directory, so ``import pkg.sub`` still
finds the file) whose attributes are resolved on first use from the
package's own ``__init__.py``: each ``from M import N`` / ``import M as N``
there says where ``N`` lives (read with ``ast``, never executed), so the
map follows whatever version is installed and nothing here lists the
dependency's names. A name the ``__init__`` does not define (a submodule)
falls through to the normal submodule import. What the ``__init__`` does
besides importing (a list of its classes, ``__all__``) is not done.

When the package was already imported (a test, a tool loaded it first),
``install`` leaves it as it is.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any


def exports(init_text: str) -> dict[str, tuple[str, str | None]]:
    """name -> (module, attribute or None for the module itself), from an ``__init__``'s imports.

    Module-level ``from M import N [as A]`` (parenthesised lists too, and
    inside ``try``/``if`` blocks) and ``import M as A``; relative imports and
    anything unparsable are left out (an unknown name is then an
    AttributeError or a submodule import, never a wrong object).
    """
    try:
        tree = ast.parse(init_text)
    except (SyntaxError, ValueError):
        return {}
    out: dict[str, tuple[str, str | None]] = {}
    nodes: list[ast.stmt] = list(tree.body)
    while nodes:
        node = nodes.pop(0)
        if isinstance(node, ast.ImportFrom):
            if node.level or not node.module or node.module == "__future__":
                continue
            for alias in node.names:
                if alias.name != "*":
                    out.setdefault(alias.asname or alias.name, (node.module, alias.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    out.setdefault(alias.asname, (alias.name, None))
        elif isinstance(node, (ast.Try, ast.If)):
            nodes.extend(node.body)
    return out


class _LazyPackage(types.ModuleType):
    """A package whose exported names are imported the first time they are read."""

    def __init__(self, name: str, path: list[str], init_file: str,
                 table: dict[str, tuple[str, str | None]]) -> None:
        super().__init__(name)
        self.__path__ = path
        self.__file__ = init_file
        self.__package__ = name
        self._lazy_exports = table

    def __getattr__(self, attr: str) -> Any:
        table = self.__dict__.get("_lazy_exports", {})
        where = table.get(attr)
        if where is None:
            raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}")
        module_name, name = where
        if name is None:
            value = importlib.import_module(module_name)
        else:
            # "from pkg import sub" names a submodule as often as an attribute.
            module = importlib.import_module(module_name)
            value = getattr(module, name) if hasattr(module, name) else importlib.import_module(
                f"{module_name}.{name}")
        setattr(self, attr, value)  # once resolved, a plain attribute
        return value


def install(root: str, packages: tuple[str, ...]) -> bool:
    """Lazy stand-ins for ``packages`` (``root`` and some of its subpackages, parents first); False
    when ``root`` was already imported (or is not installed)."""
    if root in sys.modules:
        return False
    spec = importlib.util.find_spec(root)
    if spec is None or not spec.submodule_search_locations:
        return False
    base = Path(next(iter(spec.submodule_search_locations)))
    for name in packages:
        directory = base.joinpath(*name.split(".")[1:])
        init_file = directory / "__init__.py"
        try:
            text = init_file.read_text()
        except OSError:
            return False
        module = _LazyPackage(name, [str(directory)], str(init_file), exports(text))
        module.__spec__ = importlib.util.spec_from_file_location(
            name, init_file, submodule_search_locations=[str(directory)])
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
    return True


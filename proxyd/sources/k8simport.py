"""kubernetes_asyncio without its eager imports: only the modules the API source touches are loaded.

Why: ``import kubernetes_asyncio`` (and so any of its submodules) runs
package ``__init__`` files that import every generated API class and all
~770 model classes (``kubernetes_asyncio.client.models``), about 30 MiB of
RSS that stays for the daemon's life. The API source lists and watches with
``_preload_content=False`` and parses the JSON itself, so it never builds a
model; it needs ``ApiClient``, ``Configuration``, two API classes and the
config loaders.

``install()`` puts lazy stand-ins for the heavy packages into ``sys.modules``
before anything imports them. A stand-in is a real package (its ``__path__``
is the installed directory, so ``import kubernetes_asyncio.client.rest``
still finds the file) whose attributes are resolved on first use (PEP 562
``__getattr__``) from the package's own ``__init__.py``: each ``from M import
N`` / ``import M as N`` line there says where ``N`` lives, so the map follows
whatever version is installed and nothing here lists kubernetes_asyncio's
names. A name the ``__init__`` does not define (a submodule) falls through to
the normal submodule import.

When the packages were already imported (a test, a tool loaded them first),
``install`` leaves them as they are.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import types
from pathlib import Path
from typing import Any

ROOT = "kubernetes_asyncio"
# The packages whose __init__ imports far more than the API source uses.
LAZY = (ROOT, f"{ROOT}.client", f"{ROOT}.client.models", f"{ROOT}.client.api")

_FROM = re.compile(r"^from\s+([\w.]+)\s+import\s+(\w+)\s*(?:as\s+(\w+))?\s*$")
_IMPORT_AS = re.compile(r"^import\s+([\w.]+)\s+as\s+(\w+)\s*$")


def exports(init_text: str) -> dict[str, tuple[str, str | None]]:
    """name -> (module, attribute or None for the module itself), from an ``__init__``'s import lines."""
    out: dict[str, tuple[str, str | None]] = {}
    for line in init_text.splitlines():
        m = _FROM.match(line)
        if m and m.group(1) != "__future__":
            out[m.group(3) or m.group(2)] = (m.group(1), m.group(2))
            continue
        m = _IMPORT_AS.match(line)
        if m:
            out[m.group(2)] = (m.group(1), None)
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


def install() -> bool:
    """Lazy stand-ins for kubernetes_asyncio's heavy packages; False when it was already imported
    (or is not installed)."""
    if ROOT in sys.modules:
        return False
    spec = importlib.util.find_spec(ROOT)
    if spec is None or not spec.submodule_search_locations:
        return False
    base = Path(next(iter(spec.submodule_search_locations)))
    for name in LAZY:
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


install()
# After install(): these are the lazy packages (or the real ones when they were imported before).
from kubernetes_asyncio import client, config  # noqa: E402

__all__ = ["client", "config", "exports", "install"]

"""kubernetes_asyncio without its eager imports: only the modules the API source touches are loaded.

``import kubernetes_asyncio`` (and so any of its submodules) runs package
``__init__`` files that import every generated API class and all ~770 model
classes (``kubernetes_asyncio.client.models``), about 30 MiB of RSS for the
daemon's life. The API source lists and watches with
``_preload_content=False`` and parses the JSON itself, so it never builds a
model: it needs ``ApiClient``, ``Configuration``, two API classes and the
config loaders. ``proxyd.lazypkg`` makes the heavy packages lazy; importing
``client`` and ``config`` from here guarantees the order.
"""

from __future__ import annotations

from proxyd import lazypkg
from proxyd.lazypkg import exports

ROOT = "kubernetes_asyncio"
# The packages whose __init__ imports far more than the API source uses.
LAZY = (ROOT, f"{ROOT}.client", f"{ROOT}.client.models", f"{ROOT}.client.api")

lazypkg.install(ROOT, LAZY)
# After install(): these are the lazy packages (or the real ones when they were imported before).
from kubernetes_asyncio import client, config  # noqa: E402

__all__ = ["LAZY", "ROOT", "client", "config", "exports"]

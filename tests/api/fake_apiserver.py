"""A fake Kubernetes API server that speaks the real list/watch HTTP protocol.

Enough of the API server for a client-go-style reflector, on aiohttp, so that
the real kubernetes_asyncio client can be pointed at it through a kubeconfig:

* resources ``/api/v1/services``, ``/apis/discovery.k8s.io/v1/endpointslices``,
  ``/api/v1/nodes`` (cluster-wide list/watch; namespaced paths too), all
  sharing one resourceVersion counter like etcd;
* lists with ``resourceVersion``, ``limit``/``continue`` (a consistent
  snapshot per paginated list; tokens can be expired → 410), label selectors
  (``k``, ``!k``, ``k=v``, ``k==v``, ``k!=v``, ``k in (..)``, ``k notin (..)``)
  and field selectors (``metadata.name``, ``metadata.namespace``);
* watches as chunked newline-delimited JSON events (ADDED, MODIFIED, DELETED,
  BOOKMARK with ``allowWatchBookmarks``, ERROR), replayed from any
  resourceVersion still in the history; an object edited out of (into) a
  label selector is seen as DELETED (ADDED), as the real watch cache does;
  ``timeoutSeconds`` ends the stream;
* faults: 410 Gone on watch start (HTTP status or in-stream ERROR), history
  compaction, in-stream 410 on open watches, queued HTTP errors
  (401/403/500…), dropped streams (clean end or a truncated chunk), slow
  streams, raw lines injected into streams (garbage, huge), and a full outage
  (the listening socket closed: connection refused) and recovery on the same
  port.

Every request is recorded (``requests``) for assertions. It runs in-process
(``FakeApiServer.start()``) or as a process (``python -m
tests.api.fake_apiserver --host H --port P``) controlled through
``/fake/...`` admin endpoints (``AdminClient``), e.g. inside a test network
namespace for the end-to-end test; ``--preload FILE`` starts it with a kind: List
of objects (bench/e2e_scale.py serves 10,000 services that way).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import re
import secrets
import socket
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

RESOURCES: dict[str, tuple[str, str, str, bool]] = {
    # plural: (API prefix, kind, list kind, namespaced)
    "services": ("/api/v1", "Service", "ServiceList", True),
    "endpointslices": ("/apis/discovery.k8s.io/v1", "EndpointSlice", "EndpointSliceList", True),
    "nodes": ("/api/v1", "Node", "NodeList", False),
}
_API_VERSION = {"services": "v1", "endpointslices": "discovery.k8s.io/v1", "nodes": "v1"}


@dataclass
class Request:
    """One recorded request."""

    method: str
    resource: str | None
    namespace: str | None
    query: dict[str, str]
    status: int = 0
    authorization: str = ""
    time: float = field(default_factory=time.monotonic)

    @property
    def watch(self) -> bool:
        return _truthy(self.query.get("watch"))

    @property
    def verb(self) -> str:
        return "watch" if self.watch else "list"


@dataclass
class _Event:
    rv: int
    type: str  # ADDED / MODIFIED / DELETED
    old: dict[str, Any] | None
    new: dict[str, Any]


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("true", "1")


# ---------------------------------------------------------------- selectors

_SET_RE = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_label_selector(text: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """(key, op, values) requirements; ValueError on syntax the API server would refuse."""
    reqs: list[tuple[str, str, tuple[str, ...]]] = []
    for part in _split_selector(text or ""):
        match = _SET_RE.match(part)
        if match:
            values = tuple(v.strip() for v in match.group(3).split(",") if v.strip())
            reqs.append((match.group(1), match.group(2), values))
        elif "!=" in part:
            key, value = part.split("!=", 1)
            reqs.append((key.strip(), "!=", (value.strip(),)))
        elif "==" in part:
            key, value = part.split("==", 1)
            reqs.append((key.strip(), "=", (value.strip(),)))
        elif "=" in part:
            key, value = part.split("=", 1)
            reqs.append((key.strip(), "=", (value.strip(),)))
        elif part.startswith("!"):
            reqs.append((part[1:].strip(), "!", ()))
        else:
            reqs.append((part, "exists", ()))
        if not reqs[-1][0] or " " in reqs[-1][0]:
            raise ValueError(f"bad selector requirement {part!r}")
    return reqs


def label_matches(reqs: list[tuple[str, str, tuple[str, ...]]], obj: dict[str, Any]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for key, op, values in reqs:
        present = key in labels
        value = labels.get(key)
        if op == "exists" and not present:
            return False
        if op == "!" and present:
            return False
        if op == "=" and value != values[0]:
            return False
        if op == "!=" and value == values[0]:
            return False
        if op == "in" and value not in values:
            return False
        if op == "notin" and value in values:
            return False
    return True


def parse_field_selector(text: str) -> list[tuple[str, bool, str]]:
    reqs = []
    for part in _split_selector(text or ""):
        negate = "!=" in part
        key, value = part.split("!=" if negate else ("==" if "==" in part else "="), 1)
        key = key.strip()
        if key not in ("metadata.name", "metadata.namespace"):
            raise ValueError(f"field label not supported: {key}")
        reqs.append((key, negate, value.strip()))
    return reqs


def field_matches(reqs: list[tuple[str, bool, str]], obj: dict[str, Any]) -> bool:
    meta = obj.get("metadata") or {}
    for key, negate, value in reqs:
        actual = meta.get(key.split(".", 1)[1]) or ""
        if (actual == value) == negate:
            return False
    return True


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


_REASONS = {401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 410: "Expired",
            429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable"}


class _Watcher:
    """One open watch stream."""

    def __init__(self, resource: str, response: web.StreamResponse) -> None:
        self.resource = resource
        self.response = response
        self.wake = asyncio.Event()
        self.inject: list[bytes] = []
        self.drop: str | None = None  # "clean" or "truncate"
        self.gone = False


class FakeApiServer:
    """The fake; every mutator is synchronous and safe to call from the server's loop."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, bookmark_interval: float = 0.0,
                 gone_as_status: bool = False) -> None:
        self.host = host
        self.port = port
        self.bookmark_interval = bookmark_interval
        self.gone_as_status = gone_as_status
        self.rv = 1
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {r: {} for r in RESOURCES}
        self.history: dict[str, list[_Event]] = {r: [] for r in RESOURCES}
        self.compacted_rv = 0
        self.requests: list[Request] = []
        self.fail_next: list[tuple[str | None, str | None, int]] = []  # (resource, verb, status)
        self.event_delay = 0.0
        self.watchers: set[_Watcher] = set()
        self._snapshots: dict[str, tuple[int, list[str]]] = {}
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.app = self._make_app()

    # ---- lifecycle ------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        for plural, (prefix, _, _, namespaced) in RESOURCES.items():
            app.router.add_get(f"{prefix}/{plural}", self._handle)
            if namespaced:
                app.router.add_get(f"{prefix}/namespaces/{{namespace}}/{plural}", self._handle)
        app.router.add_post("/fake/{action}", self._admin)
        app.router.add_get("/fake/requests", self._admin_requests)
        return app

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        if self._runner is None:
            self._runner = web.AppRunner(self.app, handle_signals=False, shutdown_timeout=0.5)
            await self._runner.setup()
        if self.port == 0:
            # Pick the port once, so that an outage can come back on the same one.
            with socket.socket() as probe:
                probe.bind((self.host, 0))
                self.port = probe.getsockname()[1]
        self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await self._site.start()

    async def outage(self) -> None:
        """Stop listening and cut every open stream: clients get connection refused."""
        for watcher in list(self.watchers):
            watcher.drop = "truncate"
            watcher.wake.set()
        await asyncio.sleep(0)
        if self._site is not None:
            await self._site.stop()
            self._site = None
        # TCPSite.stop() closes the listener; established keep-alive
        # connections would survive it, so close them too.
        if self._runner is not None and self._runner.server is not None:
            for proto in list(getattr(self._runner.server, "connections", [])):
                with contextlib.suppress(Exception):
                    proto.force_close()

    async def recover(self) -> None:
        await self.start()

    async def stop(self) -> None:
        for watcher in list(self.watchers):
            watcher.drop = "clean"
            watcher.wake.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._site = None

    # ---- state ------------------------------------------------------------

    def _next_rv(self) -> int:
        self.rv += 1
        return self.rv

    @staticmethod
    def _key(obj: dict[str, Any]) -> tuple[str, str]:
        meta = obj.get("metadata") or {}
        return (meta.get("namespace") or "", meta["name"])

    def apply(self, resource: str, obj: dict[str, Any]) -> int:
        """Create or replace an object; its new resourceVersion."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if RESOURCES[resource][3]:
            meta.setdefault("namespace", "default")
        rv = self._next_rv()
        meta["resourceVersion"] = str(rv)
        key = self._key(obj)
        old = self.objects[resource].get(key)
        self.objects[resource][key] = obj
        self.history[resource].append(_Event(rv, "MODIFIED" if old else "ADDED", old, obj))
        self._wake(resource)
        return rv

    def apply_many(self, resource: str, objs: Iterable[dict[str, Any]]) -> int:
        rv = self.rv
        for obj in objs:
            rv = self.apply(resource, obj)
        return rv

    def delete(self, resource: str, namespace: str, name: str) -> int:
        key = (namespace if RESOURCES[resource][3] else "", name)
        old = self.objects[resource].pop(key)
        rv = self._next_rv()
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(rv)
        self.history[resource].append(_Event(rv, "DELETED", old, gone))
        self._wake(resource)
        return rv

    def compact(self) -> None:
        """Forget all history: watches from an older resourceVersion now get 410."""
        self.compacted_rv = self.rv
        for events in self.history.values():
            events.clear()

    def expire_watches(self, resource: str | None = None) -> None:
        """Compact and send an in-stream 410 ERROR to open watches (of one resource or all)."""
        self.compact()
        for watcher in self.watchers:
            if resource is None or watcher.resource == resource:
                watcher.gone = True
                watcher.wake.set()

    def expire_continue_tokens(self) -> None:
        self._snapshots.clear()

    def drop_watches(self, resource: str | None = None, *, truncate: bool = False) -> None:
        for watcher in self.watchers:
            if resource is None or watcher.resource == resource:
                watcher.drop = "truncate" if truncate else "clean"
                watcher.wake.set()

    def inject_line(self, resource: str, line: bytes) -> int:
        """Send raw bytes (a line, newline added) on every open watch of ``resource``."""
        count = 0
        for watcher in self.watchers:
            if watcher.resource == resource:
                watcher.inject.append(line + b"\n")
                watcher.wake.set()
                count += 1
        return count

    def bookmark(self) -> None:
        """Advance the resourceVersion and send a bookmark on every watch that allows them."""
        self._next_rv()
        for watcher in self.watchers:
            watcher.wake.set()

    def fail(self, status: int, *, resource: str | None = None, verb: str | None = None,
             times: int = 1) -> None:
        """The next ``times`` matching requests answer ``status`` with a Status body."""
        self.fail_next.extend([(resource, verb, status)] * times)

    def watch_count(self, resource: str | None = None) -> int:
        return sum(1 for w in self.watchers if resource is None or w.resource == resource)

    def requests_for(self, resource: str, verb: str | None = None) -> list[Request]:
        return [r for r in self.requests if r.resource == resource and (verb is None or r.verb == verb)]

    def _wake(self, resource: str) -> None:
        for watcher in self.watchers:
            if watcher.resource == resource:
                watcher.wake.set()

    # ---- HTTP -------------------------------------------------------------

    def _resource_of(self, request: web.Request) -> str:
        return request.path.rstrip("/").rsplit("/", 1)[-1]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        resource = self._resource_of(request)
        namespace = request.match_info.get("namespace")
        query = dict(request.query)
        record = Request("GET", resource, namespace, query,
                         authorization=request.headers.get("Authorization", ""))
        self.requests.append(record)
        for i, (res, verb, status) in enumerate(self.fail_next):
            if (res is None or res == resource) and (verb is None or verb == record.verb):
                del self.fail_next[i]
                record.status = status
                body = _status(status, _REASONS.get(status, "Unknown"), f"injected {status}")
                return web.json_response(body, status=status)
        try:
            labels = parse_label_selector(query.get("labelSelector", ""))
            fields = parse_field_selector(query.get("fieldSelector", ""))
        except ValueError as err:
            record.status = 400
            return web.json_response(_status(400, "BadRequest", str(err)), status=400)

        def matches(obj: dict[str, Any] | None) -> bool:
            return obj is not None and label_matches(labels, obj) and field_matches(fields, obj) and (
                namespace is None or (obj.get("metadata") or {}).get("namespace") == namespace)

        if record.watch:
            return await self._watch(request, record, resource, matches)
        return self._list(record, resource, matches)

    def _list(self, record: Request, resource: str, matches: Any) -> web.Response:
        query = record.query
        limit = int(query.get("limit") or 0)
        token = query.get("continue")
        if token:
            snap = self._snapshots.get(token.split(":", 1)[0])
            if snap is None:
                record.status = 410
                body = _status(410, "Expired", "The provided continue parameter is too old")
                return web.json_response(body, status=410)
            list_rv, items = snap
            offset = int(token.split(":", 1)[1])
        else:
            list_rv = self.rv
            # The list is a snapshot: later changes must not show in its next pages. Held as JSON text,
            # which is such a copy at a seventh of deepcopy's cost (0.1 s for 10,000 slices, on the
            # critical path of every start measured through this server).
            items = [json.dumps(o) for _, o in sorted(self.objects[resource].items()) if matches(o)]
            offset = 0
        page = items[offset:offset + limit] if limit else items[offset:]
        meta: dict[str, Any] = {"resourceVersion": str(list_rv)}
        if limit and offset + limit < len(items):
            snap_id = token.split(":", 1)[0] if token else secrets.token_hex(6)
            self._snapshots[snap_id] = (list_rv, items)
            meta["continue"] = f"{snap_id}:{offset + limit}"
            meta["remainingItemCount"] = len(items) - offset - limit
        elif token:
            self._snapshots.pop(token.split(":", 1)[0], None)
        list_kind = RESOURCES[resource][2]
        record.status = 200
        head = json.dumps({"kind": list_kind, "apiVersion": _API_VERSION[resource], "metadata": meta})
        body = f'{head[:-1]}, "items": [{", ".join(page)}]}}'
        return web.Response(body=body.encode(), content_type="application/json")

    async def _watch(self, request: web.Request, record: Request, resource: str,
                     matches: Any) -> web.StreamResponse:
        query = record.query
        rv_text = query.get("resourceVersion") or ""
        bookmarks = _truthy(query.get("allowWatchBookmarks"))
        timeout = float(query.get("timeoutSeconds") or 0)
        try:
            start_rv = int(rv_text) if rv_text not in ("", "0") else None
        except ValueError:
            record.status = 400
            return web.json_response(_status(400, "BadRequest", "bad resourceVersion"), status=400)
        too_old = start_rv is not None and start_rv < self.compacted_rv
        if too_old and self.gone_as_status:
            record.status = 410
            return web.json_response(_status(410, "Expired", f"too old resource version: {start_rv} "
                                                             f"({self.compacted_rv})"), status=410)
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        record.status = 200
        watcher = _Watcher(resource, response)
        self.watchers.add(watcher)
        _, kind, _, _ = RESOURCES[resource]
        deadline = time.monotonic() + timeout if timeout else None

        async def send(obj: dict[str, Any]) -> None:
            if self.event_delay:
                await asyncio.sleep(self.event_delay)
            await response.write(json.dumps(obj).encode() + b"\n")

        try:
            if too_old:
                await send({"type": "ERROR", "object": _status(
                    410, "Expired", f"too old resource version: {start_rv} ({self.compacted_rv})")})
                return response
            sent_rv = start_rv if start_rv is not None else self.rv
            if start_rv is None:
                for _, obj in sorted(self.objects[resource].items()):
                    if matches(obj):
                        await send({"type": "ADDED", "object": obj})
            last_bookmark = time.monotonic()
            while True:
                # Cleared before reading the history, so an event appended
                # while we send wakes the next wait at once.
                watcher.wake.clear()
                if watcher.gone:
                    await send({"type": "ERROR", "object": _status(410, "Expired", "too old resource")})
                    return response
                # Injected lines go out before later history, in call order
                # (a test injects, then applies).
                while watcher.inject:
                    await response.write(watcher.inject.pop(0))
                for event in list(self.history[resource]):
                    if watcher.drop or watcher.gone:
                        break
                    if event.rv <= sent_rv:
                        continue
                    sent_rv = event.rv
                    was, now = matches(event.old), matches(event.new)
                    if event.type == "DELETED":
                        etype = "DELETED" if was else None
                    elif was and now:
                        etype = "MODIFIED"
                    elif now:
                        etype = "ADDED"
                    elif was:
                        etype = "DELETED"  # edited out of the selector
                    else:
                        etype = None
                    if etype:
                        await send({"type": etype, "object": event.new})
                if watcher.drop == "clean":
                    return response
                if watcher.drop == "truncate":
                    # A chunk header promising more bytes than ever come: the
                    # client sees a truncated chunked body.
                    transport = request.transport
                    if transport is not None:
                        with contextlib.suppress(Exception):
                            transport.write(b"100\r\n{\"type\":\"ADD")
                        transport.close()
                    return response
                pending = any(e.rv > sent_rv for e in self.history[resource])
                interval = self.bookmark_interval
                due = bool(interval) and time.monotonic() - last_bookmark >= interval
                if bookmarks and not pending and not watcher.gone and (self.rv > sent_rv or due):
                    sent_rv = max(sent_rv, self.rv)
                    last_bookmark = time.monotonic()
                    await send({"type": "BOOKMARK", "object": {
                        "kind": kind, "apiVersion": _API_VERSION[resource],
                        "metadata": {"resourceVersion": str(sent_rv)}}})
                    continue
                if pending or watcher.gone or watcher.drop or watcher.inject:
                    continue
                wait = 3600.0
                if deadline is not None:
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        return response
                if self.bookmark_interval:
                    wait = min(wait, max(0.0, self.bookmark_interval - (time.monotonic() - last_bookmark)))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await watcher.wake.wait()
        except (ConnectionResetError, asyncio.CancelledError, RuntimeError):
            return response
        finally:
            self.watchers.discard(watcher)

    # ---- admin (for a fake running in another process) ----------------------

    async def _admin(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        data = await request.json() if request.can_read_body else {}
        result: Any = None
        if action == "apply":
            result = self.apply(data["resource"], data["object"])
        elif action == "delete":
            result = self.delete(data["resource"], data.get("namespace", ""), data["name"])
        elif action == "compact":
            self.compact()
        elif action == "expire":
            self.expire_watches(data.get("resource"))
        elif action == "drop":
            self.drop_watches(data.get("resource"), truncate=bool(data.get("truncate")))
        elif action == "fail":
            self.fail(int(data["status"]), resource=data.get("resource"), verb=data.get("verb"),
                      times=int(data.get("times", 1)))
        elif action == "bookmark":
            self.bookmark()
        else:
            return web.json_response({"error": f"unknown action {action}"}, status=404)
        return web.json_response({"result": result, "rv": self.rv, "watches": self.watch_count()})

    async def _admin_requests(self, request: web.Request) -> web.Response:
        return web.json_response([{"resource": r.resource, "verb": r.verb, "query": r.query,
                                   "status": r.status} for r in self.requests])


class AdminClient:
    """Drives a fake running in another process (blocking; call from a thread or a sync test)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def _post(self, action: str, payload: dict[str, Any] | None = None) -> Any:
        req = urllib.request.Request(f"{self.url}/fake/{action}", data=json.dumps(payload or {}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def apply(self, resource: str, obj: dict[str, Any]) -> Any:
        return self._post("apply", {"resource": resource, "object": obj})

    def delete(self, resource: str, namespace: str, name: str) -> Any:
        return self._post("delete", {"resource": resource, "namespace": namespace, "name": name})

    def requests(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/fake/requests", timeout=10) as resp:
            return json.loads(resp.read())


def write_kubeconfig(path: str, url: str, *, token: str = "fake-token") -> str:
    """A kubeconfig pointing at ``url`` with a bearer token; returns ``path``."""
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": url}}],
        "users": [{"name": "fake", "user": {"token": token}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
    }
    with open(path, "w") as handle:
        json.dump(config, handle)  # JSON is YAML
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bookmark-interval", type=float, default=1.0)
    parser.add_argument("--preload", help="a JSON kind: List of Services, EndpointSlices, Nodes to serve")
    args = parser.parse_args()
    plurals = {kind: plural for plural, (_prefix, kind, _list, _ns) in RESOURCES.items()}

    async def serve() -> None:
        server = FakeApiServer(host=args.host, port=args.port, bookmark_interval=args.bookmark_interval)
        if args.preload:
            with open(args.preload) as handle:
                for obj in json.load(handle)["items"]:
                    server.apply(plurals[obj["kind"]], obj)
        await server.start()
        print(f"listening {server.url}", flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()

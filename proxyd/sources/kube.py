"""API-server source: list and watch Services, EndpointSlices and this node's Node.

kubernetes_asyncio has no informer, so this module is one: three small
reflectors (one per kind) that feed the tracker. Each runs the same state
machine, kopf/client-go style::

      ┌────────────── 410 Gone (list continue expired, watch too old) ──────────────┐
      ▼                                                                              │
    LIST ──(all pages, limit 500 + continue)──▶ replace_all ──▶ WATCH from list RV ──┤
      ▲  error: back off, list again                              │   ▲              │
      │                                                           │   │ stream ended, dropped,
      │                                                           │   │ idle, garbage, error:
      │                                                           ▼   │ resume from last RV
      └──────────── (never: a dropped stream does not relist) ── events, BOOKMARKs

* **List** is paginated (``limit=500`` and ``continue``) with kube-proxy's
  label selector (``!service.kubernetes.io/service-proxy-name,
  !service.kubernetes.io/headless``, on slices too) and replaces the kind's
  whole content in the tracker (``replace_all``), so objects deleted while
  we were not watching disappear. An expired continue token restarts the
  list from the first page.
* **Watch** starts from the list's resourceVersion with
  ``allowWatchBookmarks``; every event and bookmark advances the
  resourceVersion we would resume from. A stream that ends (server-side
  ``timeoutSeconds``), drops (truncated chunk: ``aiohttp.ClientPayloadError``),
  goes silent for longer than the idle timeout, or carries a line that is not
  a JSON event is closed and the watch *resumes* from the last
  resourceVersion: the server replays whatever we missed, nothing is relisted.
* **410 Gone** — as the HTTP status of a watch request or as an in-stream
  ``ERROR`` event — means our resourceVersion is older than the server's
  history: go back to LIST (immediately the first time) and replace.
* **Errors** (401, 403, 5xx, connection refused, timeouts) back off
  exponentially with jitter (0.5 s doubling to a 30 s cap), then retry the
  step that failed (a failed watch resumes, a failed list lists again); so
  does an in-stream ERROR event with any code but 410. A 401 re-reads the
  credentials (kubeconfig or service-account token: tokens rotate) into the
  live client. A healthy stream (one that delivered an event or a bookmark,
  or stayed open ``QUIET_WATCH_OK`` seconds) resets the backoff, so a drop
  after hours of service is resumed at once, not after 30 s.
* **During an outage nothing is removed**: the tracker keeps the last known
  content, so the rules stay as they are, exactly like kube-proxy.
  ``proxyd_source_connected`` drops to 0 and
  ``proxyd_source_reconnects_total{kind,reason}`` counts each attempt.

``ready`` is set once both the Service and the EndpointSlice lists are
complete (and the Node has been listed once, or its first list failed —
topology labels are a refinement, not a reason to keep a node unprogrammed),
so the daemon never programs a node from half a cluster. ``on_change`` is
only called after that; before it, events just accumulate in the tracker.

Objects are parsed from raw JSON (``_preload_content=False``) and converted
by ``proxyd.sources.convert`` — the generated OpenAPI models are 4× slower and
big. Nothing raw is kept: a page or an event line is dropped once converted.
A relist converts only the objects whose ``resourceVersion`` differs from
the one last converted (the API server bumps it on every write), so a relist
after a 410 at 10,000 services costs JSON decoding, not 20,000 conversions.

Bad input never stops the source: an invalid object is logged (once per
object and reason) with its key and counted in
``proxyd_rejected_objects_total``. Unlike kube-proxy, which would program
whatever the API server gave it, an invalid *update* keeps the previous good
version in force (on a relist too) — the same rule as the manifests source;
deleting a service because a later edit could not be read would cut its
traffic. A deletion always applies. An event line larger than
``MAX_EVENT_BYTES`` (no valid object is: etcd refuses more than 1.5 MiB) is
skipped and counted.

Config: ``--kubeconfig`` when given, else the in-cluster service account
(``KUBERNETES_SERVICE_HOST``), as kube-proxy does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any

import aiohttp
import yaml

from proxyd import heap, metrics, rejections
from proxyd.config import Config, ConfigError
from proxyd.logformat import event
from proxyd.model import ServiceName
from proxyd.sources.convert import (
    InvalidObject,
    Note,
    node_labels_from_dict,
    service_from_dict,
    slice_from_dict,
)

# Through k8simport: kubernetes_asyncio without the ~770 model classes it would import.
from proxyd.sources.k8simport import client as k8s_client
from proxyd.sources.k8simport import config as k8s_config
from proxyd.tracker import Tracker

log = logging.getLogger(__name__)

_SOURCE = "kube"
# kube-proxy's informer selectors (pkg/proxy: the service-proxy-name and
# headless labels take a Service, and its slices, away from the default proxy).
PROXY_LABEL_SELECTOR = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
PAGE_LIMIT = 500
PAGE_YIELD = 100  # list items converted between two turns of the loop while the next page loads
MAX_EVENT_BYTES = 16 * 1024 * 1024
MAX_PAGE_BYTES = 256 * 1024 * 1024
MAX_ERROR_BODY = 4096
LIST_TIMEOUT = 60.0
CONNECT_TIMEOUT = 15.0
# client-go's reflector: a server-side watch timeout of 5-10 min (random, so
# a fleet of nodes does not reconnect in step).
MIN_WATCH_TIMEOUT = 300
# A watch that stayed open this long before ending cleanly counts as healthy.
QUIET_WATCH_OK = 10.0


@dataclass(frozen=True, slots=True)
class Access:
    """One RBAC permission the source uses: (API group, resource, verbs)."""

    group: str
    resource: str
    verbs: tuple[str, ...]


# Every API call this module makes; deploy/rbac.yaml must grant each
# (tests/api/test_deploy.py checks both this list and the requests actually made).
REQUIRED_ACCESS: tuple[Access, ...] = (
    Access("", "services", ("list", "watch")),
    Access("discovery.k8s.io", "endpointslices", ("list", "watch")),
    Access("", "nodes", ("list", "watch")),
)


class KubeConfigError(ConfigError):
    """No usable cluster configuration (the message says which and why)."""


class _HttpError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status


class _Gone(Exception):
    """410: our resourceVersion (or continue token) is older than the server's history."""


class _StreamBroken(Exception):
    """The watch stream can no longer be trusted; resume from the last resourceVersion."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class Backoff:
    """Exponential backoff with jitter: ``initial · 2^(n-1)`` capped, scaled by 0.5-1.0 at random."""

    def __init__(self, *, initial: float = 0.5, cap: float = 30.0,
                 rng: Callable[[], float] = random.random) -> None:
        self.initial = initial
        self.cap = cap
        self._rng = rng

    def delay(self, attempt: int) -> float:
        base = min(self.cap, self.initial * 2.0 ** min(attempt - 1, 32))
        return base * (0.5 + 0.5 * self._rng())


def _default_watch_timeout() -> int:
    return random.randint(MIN_WATCH_TIMEOUT, 2 * MIN_WATCH_TIMEOUT)  # noqa: S311 - jitter, not crypto


# ---------------------------------------------------------------- per-kind glue


class _Kind:
    """How one resource kind is listed, converted and fed to the tracker."""

    name = ""
    group = ""
    resource = ""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.notes: list[Note] = []  # what the last convert() did not serve; reported by _accepted
        # proxyd_source_events_total of this kind, looked up once (labels() costs more than the count).
        self.events = metrics.SOURCE_EVENTS.labels(source=_SOURCE, kind=self.name)

    def list_call(self, client: k8s_client.ApiClient) -> Callable[..., Awaitable[Any]]:
        raise NotImplementedError

    def selectors(self) -> dict[str, str]:
        return {"label_selector": PROXY_LABEL_SELECTOR}

    def key(self, raw: dict[str, Any]) -> Hashable | None:
        meta = raw.get("metadata")
        if not isinstance(meta, dict):
            return None
        name, namespace = meta.get("name"), meta.get("namespace")
        if not isinstance(name, str) or not name or not isinstance(namespace, (str, type(None))):
            return None
        return (namespace or "default", name)

    def convert(self, raw: dict[str, Any]) -> Any:
        raise NotImplementedError

    def current(self, key: Any) -> Any:
        raise NotImplementedError

    def update(self, key: Any, value: Any) -> bool:
        raise NotImplementedError

    def replace(self, values: dict[Any, Any]) -> bool:
        raise NotImplementedError


class _Services(_Kind):
    name = "services"
    resource = "services"

    def list_call(self, client: k8s_client.ApiClient) -> Callable[..., Awaitable[Any]]:
        return k8s_client.CoreV1Api(client).list_service_for_all_namespaces

    def convert(self, raw: dict[str, Any]) -> Any:
        self.notes = []
        return service_from_dict(raw, self.notes)

    def current(self, key: Any) -> Any:
        return self.tracker.service(ServiceName(*key))

    def update(self, key: Any, value: Any) -> bool:
        return self.tracker.update_service(ServiceName(*key), value)

    def replace(self, values: dict[Any, Any]) -> bool:
        return self.tracker.replace_all([v for v in values.values() if v is not None], None)


class _Slices(_Kind):
    name = "endpointslices"
    group = "discovery.k8s.io"
    resource = "endpointslices"

    def list_call(self, client: k8s_client.ApiClient) -> Callable[..., Awaitable[Any]]:
        return k8s_client.DiscoveryV1Api(client).list_endpoint_slice_for_all_namespaces

    def convert(self, raw: dict[str, Any]) -> Any:
        self.notes = []
        return slice_from_dict(raw, self.notes)

    def current(self, key: Any) -> Any:
        return self.tracker.slice(key)

    def update(self, key: Any, value: Any) -> bool:
        return self.tracker.update_slice(key, value)

    def replace(self, values: dict[Any, Any]) -> bool:
        return self.tracker.replace_all(None, [v for v in values.values() if v is not None])


class _Node(_Kind):
    name = "nodes"
    resource = "nodes"

    def __init__(self, tracker: Tracker, node_name: str) -> None:
        super().__init__(tracker)
        self.node_name = node_name

    def list_call(self, client: k8s_client.ApiClient) -> Callable[..., Awaitable[Any]]:
        return k8s_client.CoreV1Api(client).list_node

    def selectors(self) -> dict[str, str]:
        return {"field_selector": f"metadata.name={self.node_name}"}

    def key(self, raw: dict[str, Any]) -> Hashable | None:
        meta = raw.get("metadata")
        name = meta.get("name") if isinstance(meta, dict) else None
        # The field selector already asks for our node only; a server that
        # sends another one anyway must not set our zone.
        return name if name == self.node_name else None

    def convert(self, raw: dict[str, Any]) -> Any:
        return node_labels_from_dict(raw)[1]

    def current(self, key: Any) -> Any:
        return dict(self.tracker.node_labels)

    def update(self, key: Any, value: Any) -> bool:
        return self.tracker.set_node_labels(value or {})

    def replace(self, values: dict[Any, Any]) -> bool:
        return self.tracker.set_node_labels(values.get(self.node_name) or {})


# ---------------------------------------------------------------- the source


class KubeSource:
    """Feeds a Tracker from the API server; ``ready`` once the initial lists are complete."""

    def __init__(
        self,
        tracker: Tracker,
        *,
        config: Config,
        on_change: Callable[[], None],
        backoff: Backoff | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        watch_idle_timeout: float = 150.0,
        watch_timeout: Callable[[], int] | None = None,
        page_limit: int = PAGE_LIMIT,
    ) -> None:
        self.tracker = tracker
        self.config = config
        self.ready = asyncio.Event()
        self._on_change = on_change
        self._backoff = backoff or Backoff()
        self._sleep = sleep
        self._idle_timeout = watch_idle_timeout
        self._watch_timeout = watch_timeout or _default_watch_timeout
        self._page_limit = page_limit
        self._kinds: tuple[_Kind, ...] = (_Services(tracker), _Slices(tracker),
                                          _Node(tracker, config.node_name))
        self._listed: set[str] = set()
        self._node_tried = False
        self._watching: set[str] = set()
        # Kinds whose current watch has delivered an event or a bookmark.
        self._delivered: set[str] = set()
        self._client: k8s_client.ApiClient | None = None
        # key → reason last logged for objects currently rejected (log once).
        self._bad: dict[tuple[str, Hashable], str] = {}
        self._noted: dict[tuple[str, Hashable], tuple[Note, ...]] = {}
        # (kind, key) → resourceVersion of the object last converted: a relist
        # converts only what changed since (the API server bumps an object's
        # resourceVersion on every write).
        self._versions: dict[tuple[str, Hashable], str] = {}
        self.resource_versions: dict[str, str | None] = {}

    # ---- lifecycle ------------------------------------------------------

    async def run(self) -> None:
        """Run until cancelled. Raises KubeConfigError when there is no usable configuration."""
        metrics.SOURCE_CONNECTED.set(0)
        self._client = await self._make_client()
        tasks = [asyncio.create_task(self._reflect(kind), name=f"kube-{kind.name}") for kind in self._kinds]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            metrics.SOURCE_CONNECTED.set(0)
            if self._client is not None:
                await self._client.close()
                self._client = None

    async def _make_client(self) -> k8s_client.ApiClient:
        configuration = await self._load_configuration()
        # Three long-lived watches plus lists must never queue behind each other.
        configuration.connection_pool_maxsize = 8
        api = k8s_client.ApiClient(configuration)
        api.user_agent = "proxyd"
        return api

    async def _load_configuration(self) -> k8s_client.Configuration:
        configuration = k8s_client.Configuration()
        try:
            if self.config.kubeconfig:
                await k8s_config.load_kube_config(config_file=self.config.kubeconfig,
                                                  client_configuration=configuration,
                                                  persist_config=False)
            elif os.environ.get("KUBERNETES_SERVICE_HOST"):
                k8s_config.load_incluster_config(client_configuration=configuration)
            else:
                raise KubeConfigError("no --kubeconfig given and not running in a cluster "
                                      "(KUBERNETES_SERVICE_HOST unset)")
        except k8s_config.ConfigException as err:
            where = f"--kubeconfig {self.config.kubeconfig}" if self.config.kubeconfig else "in-cluster"
            raise KubeConfigError(f"{where}: {_one_line(err)}") from None
        except (OSError, ValueError, TypeError, KeyError, AttributeError, yaml.YAMLError) as err:
            # A kubeconfig that is YAML but not a kubeconfig fails deep inside the loader.
            raise KubeConfigError(f"--kubeconfig {self.config.kubeconfig}: unusable "
                                  f"({type(err).__name__}: {_one_line(err)})") from None
        return configuration

    async def _reload_credentials(self) -> None:
        """After a 401: re-read the credentials (rotated token, refreshed kubeconfig).

        Copied into the live configuration rather than building a new client,
        so the other kinds' streams on the shared connection pool go on.
        """
        try:
            fresh = await self._load_configuration()
        except KubeConfigError as err:
            log.warning("kube: cannot reload credentials after 401: %s", err)
            return
        live = self._api.configuration
        live.api_key = dict(fresh.api_key)
        live.api_key_prefix = dict(fresh.api_key_prefix)
        live.refresh_api_key_hook = fresh.refresh_api_key_hook
        live.username, live.password = fresh.username, fresh.password

    @property
    def _api(self) -> k8s_client.ApiClient:
        if self._client is None:
            raise RuntimeError("KubeSource is not running")
        return self._client

    # ---- reflector --------------------------------------------------------

    async def _reflect(self, kind: _Kind) -> None:
        # self.resource_versions[kind] is where a watch resumes: every event
        # and bookmark moves it, even on a stream that later breaks.
        failures = 0
        while True:
            self._delivered.discard(kind.name)
            try:
                rv = self.resource_versions.get(kind.name)
                if rv is None:
                    rv = await self._list(kind)
                healthy = await self._watch(kind, rv)
                # A stream that simply ended (server timeout) after doing its
                # job resumes at once; one that ended without a word is a failure.
                if healthy:
                    failures = 0
                    self._reconnected(kind, "closed")
                    continue
                raise _StreamBroken("closed", "watch ended without an event")
            except asyncio.CancelledError:
                raise
            except Exception as err:
                self._watching.discard(kind.name)
                metrics.SOURCE_CONNECTED.set(0)
                reason, detail, relist = self._classify(err)
                if kind.name in self._delivered:
                    # The stream worked before it broke: a fresh failure, not
                    # one more of a series (else backoff would creep up over days).
                    failures = 0
                if relist:
                    self.resource_versions[kind.name] = None
                if isinstance(err, _HttpError) and err.status == 401:
                    await self._reload_credentials()
                if kind.name == "nodes" and not self._node_tried:
                    self._node_tried = True
                    self._check_ready()
                failures += 1
                self._reconnected(kind, reason)
                immediate = failures == 1 and reason in ("expired", "dropped", "idle", "closed")
                delay = 0.0 if immediate else self._backoff.delay(failures)
                rv = self.resource_versions.get(kind.name)
                log.warning("kube %s: %s (%s); %s in %.1fs", kind.name, reason, detail,
                            "relisting" if rv is None else f"resuming from resourceVersion {rv}", delay)
                await self._sleep(delay)

    def _classify(self, err: Exception) -> tuple[str, str, bool]:
        """(metric reason, log detail, relist?) for a failed step."""
        if isinstance(err, _Gone):
            return "expired", str(err) or "410 Gone", True
        if isinstance(err, _StreamBroken):
            return err.reason, str(err), False
        if isinstance(err, _HttpError):
            return f"http-{err.status}", str(err), False
        if isinstance(err, aiohttp.ClientPayloadError):
            return "dropped", f"stream truncated: {err}", False
        if isinstance(err, TimeoutError):
            return "timeout", "request timed out", False
        if isinstance(err, aiohttp.ClientConnectionError | OSError):
            return "connection", f"{type(err).__name__}: {err}", False
        return "error", f"{type(err).__name__}: {err}", False

    def _reconnected(self, kind: _Kind, reason: str) -> None:
        metrics.SOURCE_RECONNECTS.labels(kind=kind.name, reason=reason).inc()

    def _check_ready(self) -> None:
        if self.ready.is_set():
            return
        if {"services", "endpointslices"} <= self._listed and ("nodes" in self._listed or self._node_tried):
            log.info("kube: initial lists complete (%d services)", len(self.tracker))
            self.ready.set()

    def _changed(self) -> None:
        metrics.SOURCE_LAST_EVENT_TIMESTAMP.set(time.time())
        if self.ready.is_set():
            self._on_change()

    # ---- list -------------------------------------------------------------

    async def _list(self, kind: _Kind) -> str:
        """List every page; replace the kind's content; the list's resourceVersion.

        A list decodes and converts every object, making values that live on (or die by reference
        count): no cyclic GC meanwhile, which would rescan the growing heap page after page, and
        what the initial lists built stays out of later collections (``heap.gc_paused``).
        """
        with heap.gc_paused(freeze=not self.ready.is_set()):
            return await self._list_pages(kind)

    async def _list_pages(self, kind: _Kind) -> str:
        values: dict[Any, Any] = {}
        seen: set[Hashable] = set()
        # resourceVersions of what this list converted: remembered only once the
        # tracker holds the result (a list restarted after an expired continue
        # token must convert its first pages again).
        versions: dict[Hashable, str | None] = {}
        token: str | None = None
        rv = ""
        # The server prepares the next page while this one is converted (two cores, two processes).
        fetch: asyncio.Future[tuple[int, bytes]] | None = asyncio.ensure_future(self._page(kind, None))
        try:
            while fetch is not None:
                status, body = await fetch
                fetch = None
                try:
                    page = json.loads(body)
                except (ValueError, RecursionError) as err:
                    raise _HttpError(status, f"list page is not JSON ({type(err).__name__})") from None
                del body
                if not isinstance(page, dict):
                    raise _HttpError(status, "list page is not an object")
                raw_meta = page.get("metadata")
                meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
                items = page.get("items") or []
                if not isinstance(items, list):
                    raise _HttpError(status, "list items is not a list")
                del page
                page_rv = meta.get("resourceVersion")
                if isinstance(page_rv, str) and page_rv:
                    rv = page_rv
                token = meta.get("continue") if isinstance(meta.get("continue"), str) else None
                if token:
                    fetch = asyncio.ensure_future(self._page(kind, token))
                for n, raw in enumerate(items):
                    self._collect(kind, raw, values, seen, versions)
                    if fetch is not None and n % PAGE_YIELD == 0:
                        await asyncio.sleep(0)  # lets the next page's request go out meanwhile
                del items
        finally:
            if fetch is not None:
                fetch.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await fetch
        if not rv:
            raise _HttpError(200, "list without a resourceVersion")
        # Objects rejected before and gone now need no "valid again" memory.
        self._bad = {k: v for k, v in self._bad.items() if k[0] != kind.name or k[1] in seen}
        self._noted = {k: v for k, v in self._noted.items() if k[0] != kind.name or k[1] in seen}
        for gone in [k for k in self._versions if k[0] == kind.name and k[1] not in seen]:
            del self._versions[gone]
        if kind.replace(values):
            self._changed()
        else:
            metrics.SOURCE_LAST_EVENT_TIMESTAMP.set(time.time())
        for key, version in versions.items():
            self._remember(kind, key, version)
        self._listed.add(kind.name)
        if kind.name == "nodes":
            self._node_tried = True
        self.resource_versions[kind.name] = rv
        log.info("kube %s: listed %d at resourceVersion %s", kind.name, len(values), rv)
        self._check_ready()
        return rv

    async def _page(self, kind: _Kind, token: str | None) -> tuple[int, bytes]:
        """(HTTP status, body) of one list page."""
        kwargs: dict[str, Any] = {**kind.selectors(), "limit": self._page_limit}
        if token:
            kwargs["_continue"] = token
        resp = await kind.list_call(self._api)(**kwargs, _preload_content=False,
                                                  _request_timeout=aiohttp.ClientTimeout(
                                                      total=LIST_TIMEOUT, sock_connect=CONNECT_TIMEOUT))
        try:
            await _check_status(resp)
            return resp.status, await _read_capped(resp, MAX_PAGE_BYTES)
        finally:
            resp.close()

    def _collect(self, kind: _Kind, raw: object, values: dict[Any, Any], seen: set[Hashable],
                 versions: dict[Hashable, str | None]) -> None:
        """One listed item into ``values`` (keeping the previous good version of an invalid one)."""
        kind.events.inc()
        if not isinstance(raw, dict):
            self._reject(kind, None, "malformed", f"list item is {type(raw).__name__}")
            return
        key = kind.key(raw)
        if key is None:
            if kind.name != "nodes":  # another node, from a server that ignored the field selector
                self._reject(kind, None, "malformed", "list item without a usable name")
            return
        seen.add(key)
        rv = _resource_version(raw)
        if rv is not None and kind.name != "nodes" and self._versions.get((kind.name, key)) == rv:
            # Unchanged since it was last converted: what the tracker holds is
            # what converting it again would give (the previous good version
            # of an invalid one, already logged).
            previous = kind.current(key)
            if previous is not None:
                values[key] = previous
            return
        versions[key] = rv
        try:
            value = kind.convert(raw)
        except InvalidObject as err:
            self._reject(kind, key, "invalid", err.reason)
            previous = kind.current(key)
            if previous is not None:
                values[key] = previous
            return
        self._accepted(kind, key)
        values[key] = value

    def _remember(self, kind: _Kind, key: Hashable, rv: str | None) -> None:
        if kind.name == "nodes":
            return
        if rv is None:
            self._versions.pop((kind.name, key), None)
        else:
            self._versions[(kind.name, key)] = rv

    # ---- watch ------------------------------------------------------------

    async def _watch(self, kind: _Kind, rv: str) -> bool:
        """Watch from ``rv`` until the stream ends; whether it delivered anything."""
        resp = await kind.list_call(self._api)(
            **kind.selectors(), watch=True, allow_watch_bookmarks=True, resource_version=rv,
            timeout_seconds=self._watch_timeout(), _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT,
                                                   sock_connect=CONNECT_TIMEOUT))
        started = time.monotonic()
        try:
            await _check_status(resp)
            self._watching.add(kind.name)
            metrics.SOURCE_CONNECTED.set(1 if len(self._watching) == len(self._kinds) else 0)
            async with contextlib.aclosing(_lines(resp, idle=self._idle_timeout)) as lines:
                async for line in lines:
                    if line is None:
                        self._reject(kind, None, "too-large", f"event over {MAX_EVENT_BYTES} bytes skipped")
                        continue
                    new_rv = self._event(kind, line)
                    if new_rv:
                        self._delivered.add(kind.name)
                        self.resource_versions[kind.name] = new_rv
        finally:
            resp.close()
            self._watching.discard(kind.name)
            metrics.SOURCE_CONNECTED.set(0)
        # A quiet watch that ran its course (no events, no bookmarks from an
        # older server) is as healthy as a busy one.
        return kind.name in self._delivered or time.monotonic() - started >= QUIET_WATCH_OK

    def _event(self, kind: _Kind, line: bytes) -> str | None:
        """Apply one watch event; the resourceVersion it carries (None if none)."""
        try:
            event = json.loads(line)
        except (ValueError, RecursionError) as err:
            self._reject(kind, None, "bad-json", f"{type(err).__name__} in a {len(line)}-byte line")
            raise _StreamBroken("garbage", "a watch line is not JSON") from None
        del line
        if not isinstance(event, dict) or not isinstance(event.get("type"), str) \
                or not isinstance(event.get("object"), dict):
            self._reject(kind, None, "bad-event", "watch event without type and object")
            raise _StreamBroken("garbage", "a watch line is not an event")
        etype: str = event["type"]
        obj: dict[str, Any] = event["object"]
        if etype == "ERROR":
            code = obj.get("code")
            raw_message = obj.get("message")
            message = raw_message if isinstance(raw_message, str) else ""
            if code == 410:
                raise _Gone(f"410 Gone in the stream: {message[:200]}")
            raise _StreamBroken("error-event", f"ERROR event {code!r}: {message[:200]}")
        meta = obj.get("metadata")
        rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
        if not isinstance(rv, str) or not rv or len(rv) > 128:
            rv = None
        if etype == "BOOKMARK":
            return rv
        kind.events.inc()
        if etype not in ("ADDED", "MODIFIED", "DELETED"):
            self._reject(kind, None, "bad-event", f"unknown event type {etype[:40]!r}")
            return rv
        key = kind.key(obj)
        if key is None:
            if kind.name != "nodes":
                self._reject(kind, None, "malformed", f"{etype} object without a usable name")
            return rv
        if etype == "DELETED":
            self._accepted(kind, key)
            self._remember(kind, key, None)
            changed = kind.update(key, None)
        else:
            self._remember(kind, key, rv)
            try:
                value = kind.convert(obj)
            except InvalidObject as err:
                # Keep the previous good version in force (see the module docstring).
                self._reject(kind, key, "invalid", err.reason)
                return rv
            self._accepted(kind, key)
            changed = kind.update(key, value)
        if changed:
            self._changed()
        else:
            metrics.SOURCE_LAST_EVENT_TIMESTAMP.set(time.time())
        return rv

    # ---- rejects ------------------------------------------------------------

    def _reject(self, kind: _Kind, key: Hashable | None, category: str, reason: str) -> None:
        metrics.REJECTED_OBJECTS.labels(source=_SOURCE, kind=kind.name, reason=category).inc()
        shown = _show_key(key)
        if key is not None:
            if self._bad.get((kind.name, key)) == reason:
                return
            self._bad[(kind.name, key)] = reason
        rejections.record(_SOURCE, kind.name, shown, reason)
        log.warning("kube %s %s: skipped: %s", kind.name, shown, reason,
                    extra=event(service=shown, reason=reason))

    def _accepted(self, kind: _Kind, key: Hashable) -> None:
        if self._bad and self._bad.pop((kind.name, key), None) is not None:
            rejections.forget(_SOURCE, kind.name, _show_key(key))
            log.info("kube %s %s: valid again", kind.name, _show_key(key))
        notes, kind.notes = tuple(kind.notes), []
        self._report_notes(kind, key, notes)

    def _report_notes(self, kind: _Kind, key: Hashable, notes: tuple[Note, ...]) -> None:
        """What a valid object holds that is not served (refused addresses, ignored by design).

        Logged and counted once per content: a relist or an unrelated update
        of the object repeats nothing.
        """
        if self._noted.get((kind.name, key), ()) == notes:
            return
        if notes:
            self._noted[(kind.name, key)] = notes
        else:
            self._noted.pop((kind.name, key), None)
        for note in notes:
            counter = metrics.REJECTED_OBJECTS if note.refused else metrics.IGNORED_OBJECTS
            counter.labels(source=_SOURCE, kind=kind.name, reason=note.category).inc()
            log.log(logging.WARNING if note.refused else logging.INFO, "kube %s %s: %s: %s", kind.name,
                    _show_key(key), note.path, note.reason)


def _resource_version(raw: dict[str, Any]) -> str | None:
    meta = raw.get("metadata")
    rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
    return rv if isinstance(rv, str) and rv and len(rv) <= 128 else None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]


def _show_key(key: Hashable | None) -> str:
    if key is None:
        return "(unnamed)"
    if isinstance(key, tuple):
        return ascii("/".join(str(p) for p in key)[:200])
    return ascii(str(key)[:200])


async def _check_status(resp: aiohttp.ClientResponse) -> None:
    """Raise for a non-2xx response (``_preload_content=False`` does not)."""
    if 200 <= resp.status <= 299:
        return
    try:
        body = (await _read_capped(resp, MAX_ERROR_BODY, truncate=True)).decode("utf-8", "replace")
    except (aiohttp.ClientError, TimeoutError):
        body = ""
    message = body
    with contextlib.suppress(ValueError, RecursionError, AttributeError):
        status = json.loads(body)
        if isinstance(status, dict) and isinstance(status.get("message"), str):
            message = status["message"]
    message = " ".join(message.split())[:200]
    if resp.status == 410:
        raise _Gone(f"410 Gone: {message}")
    raise _HttpError(resp.status, message or resp.reason or "")


async def _read_capped(resp: aiohttp.ClientResponse, limit: int, *, truncate: bool = False) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await resp.content.readany()
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            if truncate:
                chunks.append(chunk[: limit - (size - len(chunk))])
                return b"".join(chunks)
            raise _HttpError(resp.status, f"response larger than {limit} bytes")
        chunks.append(chunk)


async def _lines(resp: aiohttp.ClientResponse, *, idle: float) -> AsyncGenerator[bytes | None, None]:
    """Newline-delimited lines of a watch stream; None stands for a skipped oversize line.

    Raises _StreamBroken when nothing arrives for ``idle`` seconds (a
    half-open connection) and on a truncated chunk.
    """
    buf = bytearray()
    skipping = False
    while True:
        try:
            async with asyncio.timeout(idle):
                chunk = await resp.content.readany()
        except TimeoutError:
            raise _StreamBroken("idle", f"no data for {idle:.0f}s") from None
        except aiohttp.ClientPayloadError as err:
            raise _StreamBroken("dropped", f"stream truncated ({type(err).__name__})") from None
        if not chunk:
            if buf and not skipping:
                # A last line without its newline was cut off mid-event.
                raise _StreamBroken("dropped", "stream ended inside an event")
            return
        start = 0
        while True:
            newline = chunk.find(b"\n", start)
            if newline < 0:
                if not skipping:
                    buf += chunk[start:] if start else chunk
                    if len(buf) > MAX_EVENT_BYTES:
                        buf = bytearray()
                        skipping = True
                break
            if skipping:
                skipping = False
                yield None
            elif buf:
                buf += chunk[start:newline]
                line = bytes(buf)
                buf = bytearray()
                if len(line) > MAX_EVENT_BYTES:
                    yield None
                elif line.strip():
                    yield line
            elif newline > start:
                if newline - start > MAX_EVENT_BYTES:
                    yield None
                else:
                    segment = chunk[start:newline]
                    if segment.strip():
                        yield segment
            start = newline + 1

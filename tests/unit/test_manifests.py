"""The manifests source against a real directory: parsing, merging, failures, change detection.

Every wait is bounded. Change detection runs twice: with inotify and with the
polling fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxyd.metrics import REGISTRY
from proxyd.model import ServiceName
from proxyd.sources import manifests
from proxyd.sources.manifests import ManifestError, ManifestSource, parse_documents
from proxyd.tracker import Tracker

LOGGER = "proxyd.sources.manifests"


class FakeTracker:
    """Records what the source pushes, like the real tracker's update_service/update_slice/set_node_labels."""

    def __init__(self, node_name: str = "node-a") -> None:
        self.node_name = node_name
        self.services: dict = {}
        self.slices: dict = {}
        self.labels: dict = {}
        self.pushes = 0

    def update_service(self, name, svc) -> bool:
        self.pushes += 1
        if self.services.get(name) == svc:
            return False
        if svc is None:
            del self.services[name]
        else:
            self.services[name] = svc
        return True

    def update_slice(self, key, sl) -> bool:
        self.pushes += 1
        if self.slices.get(key) == sl:
            return False
        if sl is None:
            del self.slices[key]
        else:
            self.slices[key] = sl
        return True

    def set_node_labels(self, labels) -> bool:
        changed = dict(labels) != self.labels
        self.labels = dict(labels)
        return changed

    def ips(self, service: str = "demo", namespace: str = "default") -> set[str]:
        return {e.ip for sl in self.slices.values() if sl.service_name == ServiceName(namespace, service)
                for e in sl.endpoints}


def service(name: str = "demo", *, ip: str = "10.96.0.10", port: int = 80,
            namespace: str | None = None) -> dict:
    meta = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta,
            "spec": {"clusterIP": ip, "ports": [{"port": port, "targetPort": 8080}]}}


def eslice(service_name: str = "demo", *, ips=("10.244.1.2",), name: str | None = None) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name or f"{service_name}-abcde",
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4", "ports": [{"port": 8080}],
            "endpoints": [{"addresses": [ip]} for ip in ips]}


def write(path: Path, *docs) -> None:
    path.write_text(yaml.safe_dump_all(docs))


def rejected(kind: str, reason: str) -> float:
    value = REGISTRY.get_sample_value("proxyd_rejected_objects_total",
                                      {"source": "manifests", "kind": kind, "reason": reason})
    return value or 0.0


def records(caplog, fragment: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and fragment in r.getMessage()]


async def eventually(cond, timeout: float = 1.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        await asyncio.sleep(0.01)


async def scans_pass(src: ManifestSource, count: int = 2, timeout: float = 3.0) -> None:
    """Wait until ``count`` more scans completed (so any pending change was seen).

    Sources that wait on this are started with a short ``rescan_interval``.
    """
    target = src.scans + count
    await eventually(lambda: src.scans >= target, timeout, "scans")


@pytest.fixture
async def start(tmp_path):
    tasks: list[asyncio.Task] = []

    async def _start(directory: Path = tmp_path, *, tracker=None, ready_timeout: float = 5.0, **kwargs):
        tracker = FakeTracker() if tracker is None else tracker
        changes: list[float] = []
        src = ManifestSource(str(directory), tracker, on_change=lambda: changes.append(time.monotonic()),
                             **kwargs)
        task = asyncio.create_task(src.run())
        tasks.append(task)
        ready = asyncio.create_task(src.ready.wait())
        await asyncio.wait({task, ready}, timeout=ready_timeout, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if task.done():
            task.result()
        assert src.ready.is_set()
        return src, tracker, changes

    yield _start
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, 5)


@pytest.fixture(params=["inotify", "polling"])
def watch_kwargs(request):
    if request.param == "inotify":
        return {}
    return {"use_inotify": False, "poll_interval": 0.2}


# ------------------------------------------------------------------ reading


async def test_multi_document_yaml(tmp_path, start):
    (tmp_path / "all.yaml").write_text(
        "---\n" + yaml.safe_dump(service()) + "---\n\n---\n" + yaml.safe_dump(eslice())
        + "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg}\ndata: {a: b}\n"
        + "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n")
    _src, tracker, _ = await start()
    assert set(tracker.services) == {ServiceName("default", "demo")}
    assert tracker.ips() == {"10.244.1.2"}


async def test_kubectl_list_yaml_and_json(tmp_path, start):
    listing = {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""},
               "items": [service(namespace="web"), eslice() | {"metadata": {
                   "name": "demo-x", "namespace": "web", "labels": {"kubernetes.io/service-name": "demo"}}}]}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(listing))
    other = {"apiVersion": "v1", "kind": "List", "items": [service("other", ip="10.96.0.11")]}
    (tmp_path / "b.json").write_text(json.dumps(other))
    (tmp_path / "c.yml").write_text(yaml.safe_dump(service("third", ip="10.96.0.12")))
    _src, tracker, _ = await start()
    assert set(tracker.services) == {ServiceName("web", "demo"), ServiceName("default", "other"),
                                     ServiceName("default", "third")}
    assert tracker.ips("demo", "web") == {"10.244.1.2"}


async def test_other_files_subdirectories_and_dotfiles_ignored(tmp_path, start, caplog):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "nested.yaml", service("nested"))
    write(tmp_path / ".hidden.yaml", service("hidden"))
    write(tmp_path / "notes.txt", service("text"))
    write(tmp_path / "svc.yaml.bak", service("backup"))
    write(tmp_path / "real.yaml", service("real"))
    _src, tracker, _ = await start()
    assert set(tracker.services) == {ServiceName("default", "real")}
    assert not records(caplog, "nested")


async def test_endpoints_are_mirrored_unless_real_slices_exist(tmp_path, start):
    ep = {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "demo"},
          "subsets": [{"addresses": [{"ip": "10.244.1.7"}], "ports": [{"port": 8080}]}]}
    write(tmp_path / "svc.yaml", service(), ep)
    _src, tracker, _ = await start()
    assert tracker.ips() == {"10.244.1.7"}
    # kubectl output often holds both: the real slice then stands alone.
    write(tmp_path / "slice.yaml", eslice(ips=("10.244.1.2",)))
    await eventually(lambda: tracker.ips() == {"10.244.1.2"}, what="mirror replaced by real slice")


async def test_node_labels_for_this_node_only(tmp_path, start):
    nodes = [{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "labels": {
        "topology.kubernetes.io/zone": "zone-a"}}},
             {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-b", "labels": {
                 "topology.kubernetes.io/zone": "zone-b"}}}]
    write(tmp_path / "nodes.yaml", *nodes)
    _src, tracker, _ = await start()
    assert tracker.labels == {"topology.kubernetes.io/zone": "zone-a"}
    write(tmp_path / "nodes.yaml", nodes[1])
    await eventually(lambda: tracker.labels == {}, what="labels cleared")


async def test_ignored_services_are_not_served(tmp_path, start):
    headless = service("headless")
    headless["spec"]["clusterIP"] = "None"
    external = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ext"},
                "spec": {"type": "ExternalName", "externalName": "example.com"}}
    write(tmp_path / "svc.yaml", headless, external, service())
    _src, tracker, _ = await start()
    assert set(tracker.services) == {ServiceName("default", "demo")}


async def test_empty_directory_is_ready_and_empty(tmp_path, start):
    _src, tracker, changes = await start()
    assert tracker.pushes == 0 and tracker.services == {} and changes == []


async def test_missing_directory_is_an_error(tmp_path):
    src = ManifestSource(str(tmp_path / "nope"), FakeTracker(), on_change=lambda: None)
    with pytest.raises(ManifestError, match="not a directory"):
        await asyncio.wait_for(src.run(), 5)


async def test_works_with_the_real_tracker(tmp_path, start):
    write(tmp_path / "demo.yaml", service(), eslice(ips=("10.244.1.2", "10.244.1.3")))
    tracker = Tracker("node-a")
    await start(tracker=tracker)
    state = tracker.take().state
    (name,) = state.service_ports
    assert str(name) == "default/demo"
    assert {str(e) for e in state.endpoints_of(name)} == {"10.244.1.2:8080", "10.244.1.3:8080"}


async def test_the_first_read_runs_without_the_cyclic_gc_and_freezes_what_it_built(tmp_path, start,
                                                                                   monkeypatch):
    write(tmp_path / "demo.yaml", service(), eslice())
    frozen: list[bool] = []
    real_commit = ManifestSource._commit

    def commit(self, changes):
        frozen.append(gc.isenabled())
        return real_commit(self, changes)

    monkeypatch.setattr(ManifestSource, "_commit", commit)
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(None))
    src, tracker, _changes = await start(rescan_interval=0.05)
    assert frozen == [False, None] and gc.isenabled()  # committed paused, then frozen once
    write(tmp_path / "demo.yaml", service(port=81), eslice())
    await eventually(lambda: tracker.services[ServiceName("default", "demo")].ports[0].port == 81, 3.0,
                     "edit")
    await scans_pass(src)
    assert None not in frozen[2:] and all(frozen[2:])  # later reads: the collector as usual


# ------------------------------------------------------------------ changes


async def test_add_edit_delete_applied_within_one_second(tmp_path, start, watch_kwargs):
    _src, tracker, changes = await start(**watch_kwargs)
    assert tracker.services == {}

    write(tmp_path / "demo.yaml", service(), eslice())
    await eventually(lambda: ServiceName("default", "demo") in tracker.services, 1.0, "add")
    assert len(changes) == 1

    write(tmp_path / "demo.yaml", service(port=81), eslice(ips=("10.244.1.2", "10.244.1.3")))
    await eventually(lambda: tracker.ips() == {"10.244.1.2", "10.244.1.3"}, 1.0, "edit")
    assert tracker.services[ServiceName("default", "demo")].ports[0].port == 81

    (tmp_path / "demo.yaml").unlink()
    await eventually(lambda: tracker.services == {} and tracker.slices == {}, 1.0, "delete")
    assert len(changes) == 3


async def test_atomic_rename_applied(tmp_path, start, watch_kwargs):
    write(tmp_path / "demo.yaml", service())
    _src, tracker, _ = await start(**watch_kwargs)
    for i in range(3):
        tmp = tmp_path / f".demo.yaml.tmp{i}"
        write(tmp, service(ip=f"10.96.0.{20 + i}"))
        os.replace(tmp, tmp_path / "demo.yaml")
        await eventually(lambda i=i: tracker.services[ServiceName("default", "demo")].ports[0].cluster_ip
                         == f"10.96.0.{20 + i}", 1.0, "rename")
    # A file renamed away is deleted.
    os.replace(tmp_path / "demo.yaml", tmp_path / "demo.yaml.off")
    await eventually(lambda: tracker.services == {}, 1.0, "renamed away")


async def test_configmap_style_symlinks(tmp_path, start):
    # A mounted ConfigMap: name -> ..data/name, ..data -> ..<timestamp> (swapped atomically).
    (tmp_path / "..v1").mkdir()
    write(tmp_path / "..v1" / "demo.yaml", service(ip="10.96.0.10"))
    os.symlink("..v1", tmp_path / "..data")
    os.symlink("..data/demo.yaml", tmp_path / "demo.yaml")
    _src, tracker, _ = await start()
    assert tracker.services[ServiceName("default", "demo")].ports[0].cluster_ip == "10.96.0.10"
    (tmp_path / "..v2").mkdir()
    write(tmp_path / "..v2" / "demo.yaml", service(ip="10.96.0.99"))
    os.symlink("..v2", tmp_path / "..data_tmp")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    await eventually(lambda: tracker.services[ServiceName("default", "demo")].ports[0].cluster_ip
                     == "10.96.0.99", 1.0, "configmap swap")


async def test_unchanged_touch_is_not_a_change(tmp_path, start):
    write(tmp_path / "demo.yaml", service())
    src, _tracker, changes = await start(rescan_interval=0.2)
    os.utime(tmp_path / "demo.yaml")
    await scans_pass(src)
    assert changes == []


async def test_same_object_in_two_files_last_wins_logged_once(tmp_path, start, caplog):
    caplog.set_level(logging.WARNING, LOGGER)
    write(tmp_path / "a.yaml", service(ip="10.96.0.1"))
    write(tmp_path / "b.yaml", service(ip="10.96.0.2"))
    _src, tracker, _ = await start()
    assert tracker.services[ServiceName("default", "demo")].ports[0].cluster_ip == "10.96.0.2"
    assert len(records(caplog, "defined in a.yaml and b.yaml")) == 1
    write(tmp_path / "c.yaml", service("other", ip="10.96.0.3"))
    await eventually(lambda: len(tracker.services) == 2, what="other added")
    assert len(records(caplog, "defined in a.yaml and b.yaml")) == 1
    (tmp_path / "b.yaml").unlink()
    await eventually(lambda: tracker.services[ServiceName("default", "demo")].ports[0].cluster_ip
                     == "10.96.0.1", what="a.yaml takes over")


# ------------------------------------------------------------------ failures


async def test_broken_file_keeps_last_good_content(tmp_path, start, caplog):
    caplog.set_level(logging.ERROR, LOGGER)
    write(tmp_path / "demo.yaml", service(), eslice())
    write(tmp_path / "other.yaml", service("other", ip="10.96.0.11"))
    src, tracker, _changes = await start(rescan_interval=0.2)
    before = rejected("file", "parse")

    (tmp_path / "demo.yaml").write_text("apiVersion: v1\nkind: Service\nmetadata: {name: [unclosed\n")
    await eventually(lambda: records(caplog, "demo.yaml: does not parse"), what="parse error logged")
    assert "line " in records(caplog, "demo.yaml")[0]
    assert set(tracker.services) == {ServiceName("default", "demo"), ServiceName("default", "other")}
    assert tracker.ips() == {"10.244.1.2"}
    assert rejected("file", "parse") == before + 1

    # Not logged again while the bytes stay the same, even on a touch.
    os.utime(tmp_path / "demo.yaml")
    write(tmp_path / "other.yaml", service("other", ip="10.96.0.12"))
    await eventually(lambda: tracker.services[ServiceName("default", "other")].ports[0].cluster_ip
                     == "10.96.0.12", what="other file still applies")
    await scans_pass(src)
    assert len(records(caplog, "demo.yaml")) == 1
    assert rejected("file", "parse") == before + 1

    write(tmp_path / "demo.yaml", service(port=99))
    await eventually(lambda: tracker.services[ServiceName("default", "demo")].ports[0].port == 99,
                     what="fixed file applies")
    assert tracker.ips() == set()


async def test_broken_file_at_start_is_skipped(tmp_path, start, caplog):
    (tmp_path / "bad.json").write_text('{"apiVersion": "v1", "kind": ')
    write(tmp_path / "good.yaml", service())
    _src, tracker, _ = await start()
    assert set(tracker.services) == {ServiceName("default", "demo")}
    assert records(caplog, "bad.json: does not parse: line 1")


async def test_invalid_object_logged_once_and_previous_version_kept(tmp_path, start, caplog):
    caplog.set_level(logging.ERROR, LOGGER)
    write(tmp_path / "demo.yaml", service(), service("other", ip="10.96.0.11"), eslice())
    src, tracker, _changes = await start(rescan_interval=0.2)
    before = rejected("Service", "invalid")

    bad = service(port=70000)
    write(tmp_path / "demo.yaml", bad, service("other", ip="10.96.0.12"), eslice(),
          service("new", ip="10.96.0.13"))
    await eventually(lambda: ServiceName("default", "new") in tracker.services, what="rest of file applies")
    # The invalid edit left the previous good version in force.
    assert tracker.services[ServiceName("default", "demo")].ports[0].port == 80
    assert tracker.services[ServiceName("default", "other")].ports[0].cluster_ip == "10.96.0.12"
    (message,) = records(caplog, "is invalid")
    assert "demo.yaml" in message and "Service default/demo" in message and "between 1 and 65535" in message
    assert rejected("Service", "invalid") == before + 1

    os.utime(tmp_path / "demo.yaml")
    await scans_pass(src)
    assert len(records(caplog, "is invalid")) == 1
    assert rejected("Service", "invalid") == before + 1


async def test_invalid_object_without_previous_version_is_skipped(tmp_path, start, caplog):
    bad_slice = eslice(ips=("10.244.1.300",))
    write(tmp_path / "demo.yaml", service(), bad_slice, "just a string")
    _src, tracker, _ = await start()
    assert set(tracker.services) == {ServiceName("default", "demo")}
    assert tracker.slices == {}
    assert records(caplog, "EndpointSlice default/demo-abcde is invalid")
    assert records(caplog, "not a Kubernetes object")


async def test_hostile_names_are_logged_escaped(tmp_path, start, caplog):
    bad = service()
    bad["metadata"]["name"] = "demo\n-A INPUT -j ACCEPT"
    write(tmp_path / "evil\nname.yaml", bad)
    _src, tracker, _ = await start()
    assert tracker.services == {}
    messages = records(caplog, "is invalid")
    assert messages and all("\n" not in m for m in messages)


async def test_symlink_out_of_directory_and_loop(tmp_path, start, caplog):
    outside = tmp_path / "outside"
    inside = tmp_path / "dir"
    outside.mkdir()
    inside.mkdir()
    write(outside / "secret.yaml", service("secret"))
    os.symlink(outside / "secret.yaml", inside / "escape.yaml")
    os.symlink("../outside/secret.yaml", inside / "relative.yaml")
    os.symlink("loop2.yaml", inside / "loop1.yaml")
    os.symlink("loop1.yaml", inside / "loop2.yaml")
    os.symlink("missing.yaml.target", inside / "dangling.yaml")
    write(inside / "ok.yaml", service("ok"))
    before = rejected("file", "outside_dir")
    _src, tracker, _ = await start(inside)
    assert set(tracker.services) == {ServiceName("default", "ok")}
    assert len(records(caplog, "symlink points outside the directory")) == 2
    assert len(records(caplog, "symlink loop")) == 2
    assert rejected("file", "outside_dir") == before + 2
    assert not records(caplog, "dangling")


async def test_fifo_and_directory_entries_skipped_without_hanging(tmp_path, start, caplog):
    os.mkfifo(tmp_path / "pipe.yaml")
    (tmp_path / "dir.yaml").mkdir()
    write(tmp_path / "ok.yaml", service())
    before = rejected("file", "not_regular")
    src, tracker, _ = await start(rescan_interval=0.2)
    assert set(tracker.services) == {ServiceName("default", "demo")}
    assert len(records(caplog, "not a regular file")) == 2
    assert rejected("file", "not_regular") == before + 2
    # Stays logged once across scans.
    await scans_pass(src)
    assert len(records(caplog, "not a regular file")) == 2


async def test_regular_file_replaced_by_fifo_keeps_content(tmp_path, start, caplog):
    write(tmp_path / "demo.yaml", service())
    src, tracker, _ = await start(rescan_interval=0.2)
    # Swapped in one rename, so no scan can see the file missing in between.
    os.mkfifo(tmp_path / ".fifo")
    os.replace(tmp_path / ".fifo", tmp_path / "demo.yaml")
    await eventually(lambda: records(caplog, "demo.yaml: not a regular file"), 2.0, "fifo reported")
    await scans_pass(src)
    assert set(tracker.services) == {ServiceName("default", "demo")}
    assert len(records(caplog, "demo.yaml: not a regular file")) == 1


async def test_huge_file_rejected(tmp_path, start, caplog):
    huge = tmp_path / "huge.yaml"
    with huge.open("wb") as f:
        f.truncate(manifests.MAX_FILE_SIZE + 1)  # sparse: no disk used
    write(tmp_path / "ok.yaml", service())
    before = rejected("file", "too_large")
    _src, tracker, _ = await start()
    assert set(tracker.services) == {ServiceName("default", "demo")}
    assert records(caplog, "huge.yaml: too large")
    assert rejected("file", "too_large") == before + 1


async def test_file_growing_past_limit_keeps_last_good_content(tmp_path, start, caplog):
    write(tmp_path / "demo.yaml", service())
    _src, tracker, _ = await start(max_file_size=4096)
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(service(port=81)) + "#" * 5000 + "\n")
    await eventually(lambda: records(caplog, "demo.yaml: too large"), what="too large logged")
    assert tracker.services[ServiceName("default", "demo")].ports[0].port == 80


BOMB = "\n".join(["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
                 + [f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]"
                    for i in range(8)]) + "\n"


async def test_alias_bomb_rejected_quickly(tmp_path, start, caplog):
    (tmp_path / "bomb.yaml").write_text("apiVersion: v1\nkind: Service\nmetadata: {name: bomb}\nspec:\n  x:\n"
                                        + "".join("    " + line + "\n" for line in BOMB.splitlines()))
    write(tmp_path / "ok.yaml", service())
    started = time.monotonic()
    _src, tracker, _ = await start()
    assert time.monotonic() - started < 2.0
    assert set(tracker.services) == {ServiceName("default", "demo")}
    assert records(caplog, "bomb.yaml: does not parse: YAML aliases are not allowed")


def test_parse_documents_guards():
    with pytest.raises(manifests._Unusable, match="aliases"):
        parse_documents(BOMB.encode(), is_json=False)
    with pytest.raises(manifests._Unusable, match="deeper than"):
        parse_documents(b"[" * 200_000 + b"]" * 200_000, is_json=False)
    with pytest.raises(manifests._Unusable, match="deeper than"):
        parse_documents(b"- " * 200_000 + b"x\n", is_json=False)
    with pytest.raises(manifests._Unusable, match="deeper than"):
        parse_documents(b"[" * 200_000 + b"]" * 200_000, is_json=True)
    with pytest.raises(manifests._Unusable, match=r"deeper than|nested too deeply"):
        parse_documents(b'{"a":' * 200_000 + b"1" + b"}" * 200_000, is_json=True)
    with pytest.raises(manifests._Unusable, match="not UTF-8"):
        parse_documents(b"\xff\xfe\x00garbage", is_json=False)
    with pytest.raises(manifests._Unusable, match="does not parse"):
        parse_documents(b"a: 1" + b"9" * 5000 + b"\n", is_json=True)
    with pytest.raises(manifests._Unusable, match="does not parse"):
        parse_documents(b"{1: [unhashable]}: x\n", is_json=False)
    # A BOM and a plain document are fine.
    assert parse_documents("\ufeffa: 1\n".encode(), is_json=False) == [{"a": 1}]
    assert parse_documents(b"---\n---\nb: 2\n", is_json=False) == [None, {"b": 2}]


@pytest.mark.parametrize("use_inotify", [True, False])
async def test_directory_removed_keeps_content(tmp_path, start, caplog, use_inotify):
    directory = tmp_path / "m"
    directory.mkdir()
    write(directory / "demo.yaml", service())
    src, tracker, _ = await start(directory, use_inotify=use_inotify, poll_interval=0.1)
    (directory / "demo.yaml").rename(tmp_path / "demo.yaml")
    directory.rmdir()
    await eventually(lambda: records(caplog, "cannot list the directory"), 2.0, "listing error")
    # The file vanished before the directory did: its deletion applied; the
    # listing failure itself changes nothing afterwards.
    await scans_pass(src)
    assert len(records(caplog, "cannot list the directory")) == 1
    directory.mkdir()
    write(directory / "demo.yaml", service(port=82))
    await eventually(lambda: ServiceName("default", "demo") in tracker.services
                     and tracker.services[ServiceName("default", "demo")].ports[0].port == 82, 2.0, "back")
    if use_inotify:
        # Watching again: a later edit is seen without waiting for a rescan.
        await eventually(lambda: src.watching, 2.0, "watch re-established")
        write(directory / "demo.yaml", service(port=83))
        await eventually(lambda: tracker.services[ServiceName("default", "demo")].ports[0].port == 83,
                         1.0, "edit after re-watch")


async def test_inotify_is_used_on_linux(tmp_path, start):
    src, _tracker, _ = await start()
    assert src.watching


async def test_polling_fallback_when_inotify_fails(tmp_path, start, monkeypatch):
    def broken(self, directory):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(manifests._Inotify, "__init__", broken)
    src, tracker, _ = await start(poll_interval=0.1)
    assert not src.watching and not src.use_inotify
    write(tmp_path / "demo.yaml", service())
    await eventually(lambda: ServiceName("default", "demo") in tracker.services, 1.0, "polled add")


# ------------------------------------------------------------------ hostile bytes


YAML_PIECES = ["- ", "[", "]", "{", "}", "&a ", "*a", ": ", "\n", "  ", "? ", "!!binary ",
               "!!python/object:os.system ", "'", '"', "---\n", "...\n", "#", "%YAML 1.1\n",
               "<<: ", "0x1F", "1e400", "~", "kind: List\nitems: ", "x"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode)
       | st.lists(st.sampled_from(YAML_PIECES), max_size=60).map(lambda parts: "".join(parts).encode()))
def test_parse_documents_never_raises_anything_else(data):
    for is_json in (False, True):
        try:
            docs = parse_documents(data, is_json=is_json)
        except manifests._Unusable as err:
            assert err.reason.isprintable()
            continue
        src = ManifestSource("/nonexistent", FakeTracker(), on_change=lambda: None)
        objects, _known = src._convert_all("fuzz.yaml", manifests._objects_with_digests(docs), {})
        assert isinstance(objects, dict)


_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.fixed_dictionaries(
    {"apiVersion": st.sampled_from(["v1", "discovery.k8s.io/v1"]),
     "kind": st.sampled_from(["Service", "EndpointSlice", "Endpoints", "Node", "List"])},
    optional={"metadata": _values, "spec": _values, "items": _values, "subsets": _values,
              "endpoints": _values, "addressType": _values}) | _values, max_size=5))
def test_convert_all_never_raises(docs):
    src = ManifestSource("/nonexistent", FakeTracker(), on_change=lambda: None)
    objects, _known = src._convert_all("fuzz.yaml", manifests._objects_with_digests(docs), {})
    assert isinstance(objects, dict)


# ------------------------------------------------------------------ scale: work and memory per change


def many(count: int, *, endpoints: int = 3, changed: int = -1, generation: int = 0) -> dict:
    """A kind: List of ``count`` services with a slice each; service ``changed`` gets other endpoints."""
    items = []
    for i in range(count):
        ips = [f"10.244.{i // 250}.{(i % 250) * 0 + j + 1}" for j in range(endpoints)]
        if i == changed:
            ips[0] = f"10.245.0.{generation % 250 + 1}"
        items.append(service(f"s{i}", ip=f"10.96.{i // 250}.{i % 250 + 1}"))
        items.append(eslice(f"s{i}", ips=ips))
    return {"apiVersion": "v1", "kind": "List", "items": items}


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.mark.parametrize("in_child", [False, True], ids=["in-thread", "in-child"])
@pytest.mark.parametrize("suffix", ["yaml", "json"])
async def test_unchanged_objects_in_a_rewritten_file_are_not_converted(tmp_path, start, monkeypatch, suffix,
                                                                       in_child):
    dump = json.dumps if suffix == "json" else yaml.safe_dump
    path = tmp_path / f"all.{suffix}"
    path.write_text(dump(many(50)))
    calls: list[tuple] = []
    real = manifests._convert
    monkeypatch.setattr(manifests, "_convert",
                        lambda kind, raw, notes: calls.append(kind) or real(kind, raw, notes))
    tracker = Tracker("node-a")
    # In a child process (as files of 1 MiB and more are), only new objects come back at all.
    src, _tracker, changes = await start(tracker=tracker, child_parse_size=1 if in_child else None,
                                         ready_timeout=30)
    assert len(calls) == 100 and len(tracker) == 50
    tracker.take()
    calls.clear()
    atomic_write(path, dump(many(50, changed=7, generation=1)))
    await eventually(lambda: changes, 3.0, "change applied")
    snap = tracker.take()
    assert calls == ["EndpointSlice"]
    assert snap.changed == {ServiceName("default", "s7")}
    # Rewritten with the same content (new inode, new mtime): nothing converted, nothing pushed.
    calls.clear()
    atomic_write(path, dump(many(50, changed=7, generation=1)))
    await scans_pass(src, 1)
    assert calls == [] and not tracker.pending


async def test_memory_after_20_changes_equals_memory_after_1(tmp_path, start):
    import gc
    import tracemalloc

    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump(many(300, endpoints=5)))
    tracker = Tracker("node-a")
    tracemalloc.start()
    try:
        src, _tracker, changes = await start(tracker=tracker)
        tracker.take()

        async def change(generation: int) -> int:
            count = len(changes)
            atomic_write(path, yaml.safe_dump(many(300, endpoints=5, changed=generation % 300,
                                                   generation=generation)))
            await eventually(lambda: len(changes) > count, 3.0, f"change {generation}")
            tracker.take()
            gc.collect()
            return tracemalloc.get_traced_memory()[0]

        after_one = await change(1)
        for generation in range(2, 21):
            after_twenty = await change(generation)
    finally:
        tracemalloc.stop()
    assert abs(after_twenty - after_one) <= 0.05 * after_one, (after_one, after_twenty)
    assert len(src._files["all.yaml"].known) == 600  # one digest per object, no pile-up


@pytest.mark.parametrize("suffix", ["json", "yaml"])
def test_a_big_list_with_few_new_items_is_reread_without_a_child(tmp_path, monkeypatch, suffix):
    def dump(doc: dict, *, compact: bool = False) -> str:
        if suffix == "yaml":
            return yaml.safe_dump(doc, indent=4 if compact else 2)
        return json.dumps(doc) if compact else json.dumps(doc, indent=2)

    path = tmp_path / f"all.{suffix}"
    path.write_text(dump(many(200)))
    children: list[int] = []
    real_parse = manifests.parsechild.parse
    monkeypatch.setattr(manifests.parsechild, "parse",
                        lambda *a, **k: children.append(1) or real_parse(*a, **k))
    calls: list[str] = []
    real = manifests._convert
    monkeypatch.setattr(manifests, "_convert",
                        lambda kind, raw, notes: calls.append(kind) or real(kind, raw, notes))
    tracker = Tracker("node-a")
    src = ManifestSource(str(tmp_path), tracker, on_change=lambda: None, child_parse_size=1)
    src.read_all()
    assert children == [1] and len(calls) == 400 and len(tracker) == 200
    tracker.take()
    calls.clear()
    atomic_write(path, dump(many(200, changed=7, generation=1)))
    src.read_all()
    # One new item: read here, and only it is built and converted.
    assert children == [1] and calls == ["EndpointSlice"]
    assert tracker.take().changed == {ServiceName("default", "s7")}
    assert tracker.slice(("default", "s7-abcde")).endpoints[0].ip == "10.245.0.2"
    # More new items than REREAD_NEW_ITEMS: the child parses the file, as for a first read.
    monkeypatch.setattr(manifests, "REREAD_NEW_ITEMS", 1)
    calls.clear()
    atomic_write(path, dump(many(200, changed=8, generation=2)))  # s7 back, s8 new
    src.read_all()
    assert children == [1, 1] and sorted(calls) == ["EndpointSlice"] * 2
    assert tracker.take().changed == {ServiceName("default", "s7"), ServiceName("default", "s8")}
    assert len(src._files[path.name].known) == 400
    # The same objects written otherwise (other line breaks): other texts, every item new, so the child.
    calls.clear()
    atomic_write(path, dump(many(200, changed=8, generation=2), compact=True))
    src.read_all()
    assert children == [1, 1, 1] and not tracker.take().changed


_JSON_ODD = [
    '{"kind": "List", "items": []}',
    '{"items": [], "kind": "List"}',
    '{"kind": "List"}',
    '{}',
    ' \t\r\n{ "items" : [ {"a": 1} , {"b": "}]\\"[{"} ] , "kind" : "List" } \n',
    '{"kind": "List", "items": [{"a": 1}], "items": [{"b": 2}]}',
    '{"kind": "List", "items": {"a": 1}}',
    '{"kind": "List", "items": [1, "x", null, [2]]}',
    '{"kind": "Service", "items": [{"a": 1}]}',
    '{"kind": "List", "kind": "Other", "items": [{"a": 1}]}',
    '{"kind": "List", "items": [{"a": 1}]} trailing',
    '{"kind": "List", "items": [{"a": 1},]}',
    '{"kind": "List", "items": [{"a": 1}] "x": 2}',
    '{"kind": "List" "items": []}',
    '{kind: "List"}',
    '{"kind": "List", "items": [' + '[' * 100_000 + ']' * 100_000 + ']}',
    '{"kind": "List", "items": [{"a": NaN}, {"\\ud800": "\\u00e9"}]}',
    '["kind", "List"]',
]


@pytest.mark.parametrize("text", _JSON_ODD, ids=range(len(_JSON_ODD)))
def test_json_items_by_text_give_what_the_whole_document_gives(text):
    def whole():
        return [obj for obj, _ in manifests._objects_with_digests([json.loads(text)])]

    try:
        want = whole()
    except (ValueError, RecursionError) as err:
        with pytest.raises(type(err)):
            list(manifests._json_items(text))
        return
    assert [obj for obj, _ in manifests._json_items(text)] == want


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_values, max_size=6), st.sampled_from([None, 0, 2]),
       st.dictionaries(st.sampled_from(["apiVersion", "metadata", "x"]), _values, max_size=3),
       st.booleans())
def test_json_list_items_by_text_equal_json_loads(items, indent, extra, kind_last):
    doc = ({**extra, "items": items, "kind": "List"} if kind_last
           else {"kind": "List", **extra, "items": items})
    text = json.dumps(doc, indent=indent)
    spans = manifests._json_list_spans(text)
    assert spans is not None and len(spans) == len(items)
    assert [obj for obj, _ in manifests._json_items(text)] == items
    # An item is digested by its text: equal items in equal text, equal digests; known ones are not built.
    digests = [d for _, d in spans]
    again = list(manifests._json_items(text, known=set(digests)))
    assert [d for _, d in again] == digests and all(obj is None for obj, _ in again)


def test_json_item_digest_changes_with_that_item_only():
    first = json.dumps(many(20), indent=2)
    second = json.dumps(many(20, changed=3, generation=1), indent=2)
    a = [d for _, d in manifests._json_list_spans(first)]
    b = [d for _, d in manifests._json_list_spans(second)]
    assert [i for i in range(len(a)) if a[i] != b[i]] == [7]  # s3's slice is item 7


async def test_a_change_looks_at_the_changed_file_only(tmp_path, start, monkeypatch):
    for i in range(200):
        write(tmp_path / f"s{i:03}.yaml", service(f"s{i}", ip=f"10.96.0.{i + 1}"))
    src, tracker, changes = await start()
    looked: list[str] = []
    prefix = str(tmp_path) + os.sep
    for name in ("stat", "lstat", "open"):
        real = getattr(os, name)

        def counting(path, *args, _real=real, **kwargs):
            if isinstance(path, str) and path.startswith(prefix):
                looked.append(path)
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(os, name, counting)
    reads = src.reads
    write(tmp_path / "s042.yaml", service("s42", ip="10.96.0.43", port=81))
    await eventually(lambda: changes, 3.0, "change applied")
    assert tracker.services[ServiceName("default", "s42")].ports[0].port == 81
    assert src.reads - reads == 1
    # The changed file's lstat and open; no other file is even looked at.
    assert {Path(p).name for p in looked} == {"s042.yaml"}, sorted(set(looked))[:5]


@pytest.mark.parametrize(("suffix", "shape"), [
    ("yaml", "[" + "{}," * 700_000 + "{}]"),
    ("json", "[" + "{}," * 700_000 + "{}]"),
    ("yaml", '{"kind": "List", "apiVersion": "v1", "items": [' + "{}," * 700_000 + "{}]}"),
    ("json", '{"kind": "List", "apiVersion": "v1", "items": [' + "{}," * 700_000 + "{}]}"),
    ("yaml", "items:\n" + "- {}\n" * 400_000 + "kind: List\n"),
], ids=["yaml-list", "json-list", "yaml-items", "json-items", "yaml-block-items"])
async def test_hostile_shapes_cost_bounded_memory(tmp_path, start, caplog, suffix, shape):
    import tracemalloc

    (tmp_path / f"hostile.{suffix}").write_text(shape)
    write(tmp_path / "good.yaml", service())
    tracemalloc.start()
    try:
        # Parsed here, not in a child (which would hide the cost from tracemalloc).
        # tracemalloc slows parsing ~10x: a wide margin (the bench measures the time).
        _src, tracker, _ = await start(ready_timeout=120, child_parse_size=None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert set(tracker.services) == {ServiceName("default", "demo")}
    # Today's loaders need ~500 bytes per node (~700 MB here); bounded now by
    # the per-object node budget and the per-file object count.
    assert peak < 48 * 1024 * 1024, f"peak {peak / 2**20:.0f} MiB for a {len(shape) / 2**20:.1f} MiB file"


async def test_big_hostile_file_in_a_child_is_refused_and_the_good_file_applies(tmp_path, start, caplog):
    (tmp_path / "hostile.yaml").write_text("[" + "{}," * 5_300_000 + "{}]")  # 15.9 MB
    write(tmp_path / "good.yaml", service())
    _src, tracker, _ = await start(ready_timeout=120)
    assert set(tracker.services) == {ServiceName("default", "demo")}
    assert records(caplog, "hostile.yaml: does not parse: an object has more than")

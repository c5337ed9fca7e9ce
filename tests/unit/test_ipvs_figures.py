"""ipvs mode's scale figures: a guest run's metadata and the regions rendered from it (issue 13's targets)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import runmeta, scale_figures


def _guest_run(points: list[dict[str, Any]], host: tuple[float, float] = (0.5, 0.7)) -> dict[str, Any]:
    return {"format": 1, "mode": "ipvs", "points": points, "meta": {
        "date": "2026-12-06 22:40 UTC", "commit": "abc123def456", "cpus": 2, "cpu": "QEMU Virtual CPU",
        "kernel": "6.1.0-57-amd64", "load average before": [0.1, 0, 0], "load average after": [1.9, 0, 0],
        "command": "python -m bench.sync_scale --mode ipvs --services 1000,10000 --save --backend default",
        "guest": {"in QEMU guest": True, "emulation": "QEMU TCG software emulation, no KVM, 2G, 2 vCPUs",
                  "kernel": "6.1.0-57-amd64", "cpus": 2, "memory MiB": 1987, "host kernel": "5.15.0-x",
                  "host cpus": 2, "host load average before": [host[0], 0, 0],
                  "host load average after": [host[1], 0, 0]}}}


POINT = {"mode": "ipvs", "backend": "default", "services": 10000, "endpoints": 10, "full_s": 60.0,
         "plan_full_s": 9.0, "full_cpu_s": 50.0, "incremental_s": 0.05, "incremental_cpu_s": 0.04,
         "plan_incremental_s": 0.001, "rss_mib": 180.0, "rules": 10000, "c_ip_batch_s": 10.0,
         "c_ipset_restore_s": 1.0, "c_ipvsadm_restore_s": 30.0, "c_iptables_restore_s": 0.2,
         "c_full_s": 41.2, "c_incremental_s": 0.02, "full_ratio": 1.46, "incremental_ratio": 2.5}


def test_a_guest_run_names_the_guest_and_the_hosts_load() -> None:
    line = scale_figures.run_line(_guest_run([POINT], host=(3.5, 4.0)))
    assert "inside the QEMU guest" in line and "6.1.0-57-amd64" in line and "TCG" in line
    assert "host load average (1 min) 3.5 before, 4.0 after" in line and "a loaded host" in line
    assert "tests/vm/run-in-vm.sh --cmd 'python -m bench.sync_scale --mode ipvs" in line
    assert "`abc123def456`" in line
    assert "a loaded host" not in scale_figures.run_line(_guest_run([POINT], host=(0.2, 0.3)))


def test_ipvs_targets_are_judged_against_the_c_tools() -> None:
    text = scale_figures.ipvs_table(_guest_run([POINT]))
    assert "full sync ≤ 1.5× the C tools: met (1.46×)" in text
    assert "incremental ≤ 1.5× the C tools: **not met** (2.5×)" in text
    assert "`ipvsadm-restore` 30 s" in text and "| 10,000 × 10 | 60 s (50 s) | 9 s | 41.2 s | 1.46× |" in text
    summary = scale_figures.ipvs_summary(_guest_run([POINT]))
    assert "against 41.2 s for the C tools doing the same work (1.46×)" in summary


def test_a_smaller_run_says_the_target_size_was_not_measured_and_shows_failures() -> None:
    small = {**POINT, "services": 1000}
    failed = {"mode": "ipvs", "backend": "default", "services": 10000, "error": "timed out after 1800s"}
    text = scale_figures.ipvs_table(_guest_run([small, failed]))
    assert "not measured in this run (sizes measured: 1,000 × 10)" in text
    assert "ipvs at 10,000 services failed in this run: timed out after 1800s." in text


def test_runmeta_records_a_guest_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PROXYD_IN_VM", "1")
    monkeypatch.setenv("PROXYD_BENCH_COMMIT", "0123456789ab")
    monkeypatch.setenv("PROXYD_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setenv("PROXYD_VM_EMULATION", "QEMU TCG software emulation, no KVM, 2G, 2 vCPUs")
    monkeypatch.setenv("PROXYD_VM_HOST_KERNEL", "5.15.0-host")
    monkeypatch.setenv("PROXYD_VM_HOST_CPUS", "2")
    monkeypatch.setenv("PROXYD_VM_HOST_LOAD", "1.50 1.20 0.90")
    run = runmeta.Run(["python", "-m", "bench.sync_scale"])
    path = run.save("sync_scale-test", {"points": []})
    assert path.parent == tmp_path
    meta = json.loads(path.read_text())["meta"]
    assert meta["commit"] == "0123456789ab"
    guest = meta["guest"]
    assert guest["in QEMU guest"] is True and guest["emulation"].startswith("QEMU TCG")
    assert guest["host kernel"] == "5.15.0-host" and guest["host cpus"] == 2
    assert guest["host load average before"] == [1.5, 1.2, 0.9]
    runmeta.add_host_load_after(path)
    after = json.loads(path.read_text())["meta"]["guest"]["host load average after"]
    assert len(after) == 3 and all(isinstance(x, float) for x in after)


@pytest.mark.parametrize("load", ["", "garbage", "1 2 x"])
def test_a_malformed_host_load_is_recorded_as_unknown(monkeypatch: pytest.MonkeyPatch, load: str) -> None:
    monkeypatch.setenv("PROXYD_VM_HOST_LOAD", load)
    monkeypatch.setenv("PROXYD_VM_HOST_CPUS", "")
    guest = runmeta.guest_meta()
    assert guest["host load average before"] is None and guest["host cpus"] is None
    line = scale_figures.run_line({"meta": {"guest": guest}})
    assert "host load average (1 min) ? before" in line


def test_a_host_run_records_no_guest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROXYD_IN_VM", raising=False)
    assert "guest" not in runmeta.Run(["x"]).meta()

"""Figures in README.md and docs/ come from stored results files, and only from passed tests."""

from __future__ import annotations

import pytest

from bench import docs_figures, reliability_figures


def test_every_region_matches_its_stored_run() -> None:
    """A hand-edited figure, or a results file changed without rerunning the command, fails here."""
    assert docs_figures.main(["--check"]) == 0, "run: python -m bench.docs_figures"


@pytest.mark.parametrize("name", sorted(docs_figures.REGIONS))
def test_each_region_exists_once_and_names_its_source(name: str) -> None:
    file, source, _ = docs_figures.REGIONS[name]
    text = (docs_figures.REPO / file).read_text()
    assert text.count(f"<!-- figures:{name} ") == 1 and text.count(f"<!-- /figures:{name} -->") == 1
    assert source in docs_figures.rendered(name)


def test_a_stale_region_is_rewritten_and_prose_around_it_kept() -> None:
    text = ("before\n<!-- figures:programming (generated) -->\nold 999 ms\n"
            "<!-- /figures:programming -->\nafter\n")
    out, found = docs_figures.update(text, "programming")
    assert found and out.startswith("before\n") and out.endswith("after\n")
    assert "999" not in out and "p50 of" in out
    assert docs_figures.update("no markers here", "programming") == ("no markers here", False)


def test_failed_tests_figures_are_not_counted() -> None:
    data = {"format": 2, "meta": {"date": "d", "pytest": "1 passed, 1 failed"}, "tests": {
        "a::ok": {"outcome": "passed", "figures": {"connections_held": 10, "connections_lost": 0}},
        "a::bad": {"outcome": "failed", "figures": {"connections_held": 5000, "connections_lost": 0}},
        "a::err": {"outcome": "error", "figures": {"connections_lost": 7}},
    }}
    totals = reliability_figures.totals(reliability_figures.tests_of(data))
    assert totals == {"held": 10, "faults": 1, "inputs": 0, "lost": 0}
    text = reliability_figures.render(data)
    assert "5000" not in text and "`a::bad`: failed" in text and "`a::err`: error" in text
    assert "1 passed, 1 failed" in text


def test_old_figures_without_outcomes_count_nothing() -> None:
    old = {"a::t": {"connections_held": 10}}
    assert reliability_figures.totals(reliability_figures.tests_of(old))["held"] == 0


# -- the scale regions: each from a benchmark's --save file (bench/runmeta.py) ----------------------

SCALE_REGIONS = sorted(n for n, (_, src, _) in docs_figures.REGIONS.items()
                       if src not in (docs_figures.FULL, docs_figures.RELIABILITY))


@pytest.mark.parametrize("name", SCALE_REGIONS)
def test_a_hand_edited_scale_region_is_caught_and_rewritten(name: str) -> None:
    file, source, _ = docs_figures.REGIONS[name]
    text = (docs_figures.REPO / file).read_text()
    body = docs_figures.region_pattern(name).search(text)
    assert body is not None, f"{file} lost its figures:{name} region"
    region = body.group(2)
    figures = region.index("\n\n")  # past the line naming the run: edit a figure itself
    digit = next(i for i, ch in enumerate(region) if ch.isdigit() and i > figures)
    edited = region[:digit] + ("8" if region[digit] != "8" else "9") + region[digit + 1:]
    hand = text[:body.start(2)] + edited + text[body.end(2):]
    out, found = docs_figures.update(hand, name)
    assert found and out == text, "the command must restore the stored run's figures"
    assert "commit `" in region and "load average (1 min)" in region and source in region


def _run(load: float, points: list[dict[str, object]]) -> dict[str, object]:
    return {"format": 1, "mode": "nftables", "points": points, "meta": {
        "date": "2026-01-01 00:00 UTC", "commit": "abc123", "cpus": 2, "cpu": "X",
        "load average before": [load, 0, 0], "load average after": [load, 0, 0],
        "command": "python -m bench.sync_scale --mode nftables --save"}}


def test_the_run_line_names_the_run_and_a_loaded_machine() -> None:
    from bench import scale_figures

    busy = scale_figures.run_line(_run(6.0, []))
    assert "2026-01-01" in busy and "`abc123`" in busy and "--save" in busy and "6.0 before" in busy
    assert "loaded machine" in busy
    assert "loaded machine" not in scale_figures.run_line(_run(0.2, []))


def test_a_failed_point_is_shown_and_targets_are_judged() -> None:
    from bench import scale_figures

    good = {"services": 10000, "endpoints": 10, "backend": "library", "full_s": 4.0, "full_cpu_s": 1.5,
            "incremental_s": 0.002, "incremental_cpu_s": 0.001, "rss_mib": 100.0, "plan_full_s": 1.0,
            "rules": 130000}
    bad = {"services": 30000, "backend": "library", "error": "Traceback ...\nOSError: no room"}
    text = scale_figures.sync_table(_run(1.0, [good, bad]))
    assert "30,000 services failed in this run: OSError: no room" in text
    assert "full sync ≤ 2 s: **not met** (4 s; CPU 1.5 s)" in text
    assert "incremental ≤ 10 ms: met (2 ms; CPU 1 ms)" in text
    assert "RSS ≤ 150 MB: met (105 MB)" in text


def test_a_missing_results_file_fails_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    regions = dict(docs_figures.REGIONS)
    regions["nftables-summary"] = ("README.md", "bench/results/no-such-run.json",
                                   regions["nftables-summary"][2])
    monkeypatch.setattr(docs_figures, "REGIONS", regions)
    assert docs_figures.main(["--check"]) == 1


def test_the_restore_tools_table_shows_a_failed_back_end_and_each_small_transaction() -> None:
    from bench import scale_figures

    nft = {"services": 10000, "endpoints": 10, "nat_rules": 320004, "lines": 430000, "bytes": 32_600_000,
           "transactions": 78, "full_s": 10.3, "declare_chain_s": 0.02, "append_unreachable_s": 0.015,
           "insert_jump_s": 0.108, "delete_jump_s": 0.144, "incremental_plan_s": 0.009,
           "incremental_restore_s": 0.12, "canary_check_s": 0.03, "cleanup_s": 5.0, "repeat": 5}
    failed = {"error": "RuntimeError: iptables-legacy-restore exited 4"}
    text = scale_figures.iptables_planner_input({"planner_input": {"legacy": failed, "nft": nft}})
    assert "10,000 ClusterIP services × 10 endpoints (320,004 nat rules)" in text and "medians of 5" in text
    assert "| the full input | – | 10.3 s (430,000 lines, 32.6 MB, 78 transactions) |" in text
    assert "| inserting one jump into `KUBE-SERVICES` | – | 108 ms |" in text
    assert "legacy: failed in this run: RuntimeError: iptables-legacy-restore exited 4." in text
    assert scale_figures.iptables_planner_input({}) == "Not measured in this run (`--services 0`)."


def test_the_dual_stack_cost_table_has_every_run() -> None:
    from bench import scale_figures

    runs = [{"mode": "nftables", "families": f, "services": 10000, "endpoints": 10, "full_s": full,
             "incremental_median_ms": inc, "incremental_min_ms": inc / 2, "loadavg_1m": 3.5}
            for f, full, inc in (("4 (mode alone)", 1.6, 0.6), ("4,6 (DualStackMode)", 1.8, 1.0))]
    text = scale_figures.dualstack_cost({"repeat": 15, "runs": runs})
    assert "15 times per run" in text
    assert "| nftables | 4 (mode alone) | 10,000 × 10 | 1.6 s | 0.6 ms / 0.3 ms | 3.5 |" in text
    assert "| nftables | 4,6 (DualStackMode) | 10,000 × 10 | 1.8 s | 1 ms / 0.5 ms | 3.5 |" in text
    assert scale_figures.dualstack_cost({"runs": []}) == "No run stored."


# -- no typed-in figure outside generated text (bench/figure_lint.py) -------------------------------

def test_no_unbacked_figure_in_readme_and_docs() -> None:
    from bench import figure_lint

    problems = figure_lint.check()
    assert not problems, "\n".join(problems)


# Lines of docs/reliability.md and README.md as they were before the figures were generated.
_OLD_LINES = (
    "| SIGTERM in iptables mode | exits 0 and leaves the rules: 135 new connections served in the 3 s "
    "proxyd was down |",
    "the daemon exits as soon as the last one ends (1.15 s after SIGTERM here) with code 0",
    "refused after 0.75 s with `does not parse`, child peak 97 MiB, daemon RSS back to its level",
    "served again 2.2 s (nft) / 2.7 s (legacy) after the damage with `--sync-period 2s`",
    "retries back off (gaps between attempts 0.26 → 0.5 → 0.67 → 1.17 → 2.01 → 2.37 s: doubling",
    "but not yet the 0.9× per new connection that issue 15 asks for",
    "idle 0.01 % CPU, a full stat rescan 75 ms (0.13 % averaged), 1.6 % CPU; 17,418 requests/s",
)


@pytest.mark.parametrize("line", _OLD_LINES)
def test_a_typed_in_measurement_is_caught(line: str) -> None:
    from bench import figure_lint

    assert figure_lint.problems("docs/x.md", line + "\n", allowed=())


def test_generated_historic_code_and_bound_figures_pass_and_others_fail() -> None:
    from bench import figure_lint

    ok = ("<!-- figures:x (generated: do not edit) -->\n1.2 s and 3 MiB\n<!-- /figures:x -->\n"
          "exits after <!-- fig test_a exit_seconds s -->1.41 s<!-- /fig --> here\n"
          "<!-- historic: before the fix, commit 2f2caa3 -->19 to 1,009 descriptors in 3 s"
          "<!-- /historic -->\n"
          "run `pytest --timeout 30s` or\n```sh\nsleep 5s  # 3 minutes\n```\n"
          "target: full ≤ 2 s, incremental ≤ 100 ms, handled in < 1 s\n")
    assert figure_lint.problems("docs/x.md", ok, allowed=()) == []
    undated = "<!-- historic: an old run -->took 30 s<!-- /historic -->\n"
    assert any("without 'commit" in p for p in figure_lint.problems("docs/x.md", undated, allowed=()))
    allowed = (figure_lint.Allowed("docs/x.md", "a timeout of 5 s", "a constant"),)
    assert figure_lint.problems("docs/x.md", "with a timeout of 5 s here\n", allowed=allowed) == []
    # The phrase protects only itself: the same figure elsewhere is still caught.
    assert len(figure_lint.problems("docs/x.md", "a timeout of 5 s; served in 5 s\n", allowed=allowed)) == 1
    # An allow-listed phrase that is gone from the file is reported, so the list cannot go stale.
    assert figure_lint.problems("docs/x.md", "nothing\n", allowed=allowed)[0].startswith(
        "docs/x.md: allow-listed phrase not found")


def test_the_allow_list_is_small_and_each_entry_has_a_reason() -> None:
    from bench import figure_lint

    assert len(figure_lint.ALLOWED) <= 60, "the allow-list is for design constants only"
    for entry in figure_lint.ALLOWED:
        assert entry.reason.strip() and entry.file in figure_lint.docs()
        assert figure_lint.FIGURE.search(entry.phrase), f"{entry.phrase!r} holds no figure"


def test_historic_blocks_name_a_commit_of_this_repository() -> None:
    import re
    import subprocess

    from bench import figure_lint

    repo = docs_figures.REPO
    headers = [m.group(1) for file in figure_lint.docs()
               for m in re.finditer(r"<!-- historic:([^>]*)-->", (repo / file).read_text())]
    assert headers, "the docs keep their historic figures in historic blocks"
    commits = {re.search(r"commit ([0-9a-f]{7,40})", h).group(1) for h in headers}  # type: ignore[union-attr]
    shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=repo, capture_output=True,
                             text=True, check=False).stdout.strip()
    if (repo / ".git").exists() and shallow == "false":  # a shallow CI clone lacks old commits
        for commit in commits:
            got = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=repo, check=False)
            assert got.returncode == 0, f"historic block names unknown commit {commit}"


def _defaults(function: object) -> dict[str, object]:
    import inspect

    return {name: p.default for name, p in inspect.signature(function).parameters.items()}  # type: ignore[arg-type]


def test_the_allow_listed_design_constants_match_the_code() -> None:
    """The docs quote these constants (bench/figure_lint.py ALLOWED); a change in the code fails here."""
    from proxyd import httpserve
    from proxyd.config import Config
    from proxyd.modes.ipvs.mode import IpvsMode
    from proxyd.modes.nftables import libnft
    from proxyd.modes.userspace import engine, listeners, mode, pump, tcp
    from proxyd.netfilter import backend
    from proxyd.sources import kube, manifests, parsechild

    assert tcp.DIAL_TIMEOUTS == (0.25, 0.5, 1.0, 2.0)
    assert (listeners.KEEPALIVE_IDLE, listeners.KEEPALIVE_INTERVAL) == (15, 15)
    assert mode.SHUTDOWN_GRACE == 5.0 and httpserve.HEAD_TIMEOUT == 5.0
    assert (engine.PAUSE_LOG_EVERY, engine.DRAIN_POLL, pump.STARVED_RETRY) == (10.0, 0.05, 0.02)
    assert (pump.PIPE_SIZE, pump.COPY_BUFFER) == (256 * 1024, 64 * 1024)
    assert parsechild.MEMORY_LIMIT == 768 * 1024 * 1024 and manifests.BIG_FILE == 1 << 20
    assert (manifests.SAFETY_RESCAN, manifests.FULL_RESCAN) == (5.0, 60.0)
    assert libnft.TRIM_ABOVE == 1 << 20 and backend.DEFAULT_TIMEOUT == 900.0
    assert Config().min_sync_period == 1.0
    assert _defaults(kube.Backoff)["initial"] == 0.5 and _defaults(kube.Backoff)["cap"] == 30.0
    assert _defaults(IpvsMode)["graceful_interval"] == 2.0
    core = (docs_figures.REPO / "native/engine_core.h").read_text()
    assert "#define PE_SMALL (16 * 1024)" in core
    assert "#define PE_NAP_EVENTS 2\n" in core and "#define PE_NAP_BYTES (64 * 1024)" in core
    assert "prctl(PR_SET_TIMERSLACK, 1UL," in core
    engine_pyx = (docs_figures.REPO / "native/engine.pyx").read_text()
    assert "double ack_hold=0.005" in engine_pyx and "double nap=30e-6" in engine_pyx
    assert "double stream_nap=150e-6" in engine_pyx
    assert "timeout_s=${VM_TIMEOUT:-3600}" in (docs_figures.REPO / "tests/vm/run-in-vm.sh").read_text()


# -- generated cells: one figure of a reliability test inside prose --------------------------------

_CELL_RUN = {"format": 2, "meta": {}, "tests": {
    "tests/reliability/t.py::test_ok": {"outcome": "passed",
                                        "figures": {"n": 33432, "s": 1.41, "gaps": [0.5, 1.0]}},
    "tests/reliability/t.py::test_bad": {"outcome": "failed", "figures": {"n": 5000}},
}}


def test_a_cell_shows_a_passed_tests_figure_and_nothing_else() -> None:
    cell = docs_figures.cell
    assert cell(_CELL_RUN, "test_ok", "n") == "33,432"
    assert cell(_CELL_RUN, "test_ok", "s", "s") == "1.41 s"
    assert cell(_CELL_RUN, "test_ok", "gaps", "s") == "0.5 → 1 s"
    assert cell(_CELL_RUN, "test_bad", "n") == "(not counted: the test failed)"
    assert cell(_CELL_RUN, "test_gone", "n") == "(not in the stored run)"
    assert cell(_CELL_RUN, "test_ok", "missing") == "(no missing in the stored run)"


def test_a_hand_edited_cell_is_rewritten() -> None:
    text = ("exited <!-- fig test_ok s s -->0.9 s<!-- /fig --> after SIGTERM, "
            "<!-- fig test_bad n -->5,000<!-- /fig -->")
    assert docs_figures.update_cells(text, _CELL_RUN) == (
        "exited <!-- fig test_ok s s -->1.41 s<!-- /fig --> after SIGTERM, "
        "<!-- fig test_bad n -->(not counted: the test failed)<!-- /fig -->")

"""No shell and no string-built commands anywhere in the package.

proxyd runs with network-admin power and feeds object names into kernel
tools; a command line built as a string is one quoting mistake away from
injection. Every external program is run with an argv list, so this test
walks the package's syntax trees and rejects ``shell=True``, ``os.system``,
``os.popen`` and subprocess calls whose command is a string.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "proxyd"
SUBPROCESS_CALLS = {"run", "Popen", "call", "check_call", "check_output", "create_subprocess_exec",
                    "getoutput", "getstatusoutput"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Attribute):
        return f"{_name(func.value)}.{func.attr}"
    if isinstance(func, ast.Name):
        return func.id
    return ""


def find_problems(source: str, filename: str) -> list[str]:
    problems = []
    for call in _calls(ast.parse(source, filename)):
        name = _name(call.func)
        where = f"{filename}:{call.lineno}"
        for keyword in call.keywords:
            if keyword.arg == "shell" and not (isinstance(keyword.value, ast.Constant)
                                               and keyword.value.value is False):
                problems.append(f"{where}: shell= argument")
        if name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput",
                    "asyncio.create_subprocess_shell", "create_subprocess_shell"):
            problems.append(f"{where}: {name}")
        short = name.rsplit(".", 1)[-1]
        if short in SUBPROCESS_CALLS and call.args:
            first = call.args[0]
            if isinstance(first, ast.JoinedStr | ast.BinOp) or (
                    isinstance(first, ast.Constant) and isinstance(first.value, str) and " " in first.value
                    and short != "create_subprocess_exec"):
                problems.append(f"{where}: {name} with a string-built command")
    return problems


def test_checker_catches_what_it_should():
    bad = ("import os, subprocess\nsubprocess.run('ls -l', shell=True)\nos.system('x')\n"
           "subprocess.Popen(f'ip {x}')\n")
    assert len(find_problems(bad, "bad.py")) == 4


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_package_module_runs_no_shell(path):
    assert find_problems(path.read_text(), str(path)) == []


# Helper processes run in a session of their own, so a signal sent to the daemon's process group
# (Ctrl-C, ``kill -TERM -PGID``) reaches the daemon only and the tool in flight finishes (proxyd.daemon).
SPAWNING = {"subprocess.run", "subprocess.Popen", "asyncio.create_subprocess_exec"}


def outside_own_session(source: str, filename: str) -> list[str]:
    problems = []
    for call in _calls(ast.parse(source, filename)):
        if _name(call.func) not in SPAWNING:
            continue
        own = any(k.arg == "start_new_session" and isinstance(k.value, ast.Constant) and k.value.value is True
                  for k in call.keywords)
        if not own:
            problems.append(f"{filename}:{call.lineno}: {_name(call.func)} without start_new_session=True")
    return problems


def test_session_checker_catches_what_it_should():
    bad = ("import asyncio, subprocess\nsubprocess.run(['ip'])\n"
           "subprocess.run(['ip'], start_new_session=False)\n"
           "asyncio.create_subprocess_exec('nft')\nsubprocess.run(['ip'], start_new_session=True)\n")
    assert [p.split(":")[1] for p in outside_own_session(bad, "bad.py")] == ["2", "3", "4"]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_package_helper_processes_run_in_their_own_session(path):
    assert outside_own_session(path.read_text(), str(path)) == []

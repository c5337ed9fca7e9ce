"""The API source loads kubernetes_asyncio without its ~770 model classes (proxyd.sources.k8simport)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from proxyd.sources.k8simport import exports

_PROBE = """
import json, sys
import proxyd.sources.kube as kube
c, cfg = kube.k8s_client, kube.k8s_config
names = [c.ApiClient.__name__, c.Configuration.__name__, c.CoreV1Api.__name__, c.DiscoveryV1Api.__name__,
         cfg.load_kube_config.__name__, cfg.load_incluster_config.__name__, cfg.ConfigException.__name__]
models = sorted(m for m in sys.modules if m.startswith("kubernetes_asyncio.client.models."))
print(json.dumps({"names": names, "models": models,
                  "list": callable(c.CoreV1Api.list_service_for_all_namespaces)}))
"""


def test_api_source_imports_no_model_class() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True,
                         timeout=120)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["names"] == ["ApiClient", "Configuration", "CoreV1Api", "DiscoveryV1Api", "load_kube_config",
                            "load_incluster_config", "ConfigException"]
    assert got["models"] == []
    assert got["list"] is True


def test_unknown_name_is_an_attribute_error() -> None:
    from proxyd.sources.k8simport import client
    with pytest.raises(AttributeError):
        _ = client.NoSuchThingAnywhere


def test_exports_reads_module_level_imports_only() -> None:
    text = "\n".join([
        "from __future__ import absolute_import",
        "from pkg.a import A",
        "from pkg.b import B as Bee",
        "import pkg.c as c",
        "import os",
        "from pkg.d import (E,",
        "    F)",
        "from . import relative",
        "from pkg.star import *",
        "try:",
        "    from pkg.t import T",
        "except ImportError:",
        "    T = None",
        "def f():",
        "    from pkg.inner import Inner",  # not module level: not an export
        "x = 1",
        "from pkg.e import " + "G" * 100_000,  # huge name: still one entry
    ])
    got = exports(text)
    assert got == {"A": ("pkg.a", "A"), "Bee": ("pkg.b", "B"), "c": ("pkg.c", None), "E": ("pkg.d", "E"),
                   "F": ("pkg.d", "F"), "T": ("pkg.t", "T"), "G" * 100_000: ("pkg.e", "G" * 100_000)}


@pytest.mark.parametrize("text", ["from pkg import (A", "\x00garbage from import", "def (:", "\ufeff" * 3])
def test_exports_of_unparsable_text_is_empty(text: str) -> None:
    assert exports(text) == {}


def test_pyroute2_is_lazy_in_the_daemon() -> None:
    probe = ("import sys, json, proxyd.daemon\n"
             "from pyroute2 import IPRoute\n"
             "print(json.dumps({'ndb': 'pyroute2.ndb.main' in sys.modules,"
             " 'ipdb': 'pyroute2.ipdb' in sys.modules, 'iproute': IPRoute.__module__}))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         timeout=120)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"ndb": False, "ipdb": False, "iproute": "pyroute2.iproute.linux"}

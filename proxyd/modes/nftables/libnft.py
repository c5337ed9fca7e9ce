"""Running nft commands: libnftables in process (ctypes, one long-lived context), ``nft -f -`` otherwise.

Debian's ``python3-nftables`` module does not import inside a virtualenv and
PyPI's ``pip-nftables`` is a copy of it, so this is a small binding of our
own over the same C library (``libnftables.so.1``, Debian package
``libnftables1``, which ``nftables`` depends on). It uses six functions of
the stable libnftables API: make a context, buffer its output and error
streams, run a command buffer, read the buffers.

One ``run_cmd_from_buffer`` call is one netlink batch: every command in the
text commits together or not at all, exactly as ``nft -f``. The context
keeps no ruleset cache between calls that could go stale (nft refreshes
what a command needs at each call), so reusing it is safe and saves the
library set-up a subprocess pays every time.

A context is not thread-safe: ``Nft`` serialises calls with a lock, so it
may be driven from worker threads (``asyncio.to_thread``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import shutil
import subprocess
import threading
from typing import Any

from proxyd import heap

LIBRARY = "libnftables.so.1"
# nft_ctx_output_set_flags: NFT_CTX_OUTPUT_HANDLE | NFT_CTX_OUTPUT_JSON | NFT_CTX_OUTPUT_TERSE.
_OUT_HANDLE, _OUT_JSON, _OUT_TERSE = 1 << 3, 1 << 4, 1 << 7
# The real NFT_CTX_OUTPUT_TERSE (1 << 7 above is NUMERIC_PROTO: protocols print as numbers). With it,
# ``list ruleset`` leaves set elements out and, on nft 1.0.6, does not fetch them (~15 ms instead of
# seconds at 100,000 elements; ``list table`` fetches them either way).
OUT_TERSE = 1 << 11


class NftError(Exception):
    """nft refused a command buffer; nothing of it was applied."""

    def __init__(self, message: str, *, commands: str = "") -> None:
        super().__init__(message.strip() or "nft failed")
        self.commands = commands


# libnftables builds an expression tree per element while parsing (~400 MB for 130,000 elements)
# and frees it afterwards, but glibc keeps the freed heap: give it back after big transactions.
TRIM_ABOVE = 1 << 20


def _load() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(LIBRARY)
    except OSError:
        name = ctypes.util.find_library("nftables")
        if name is None:
            return None
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            return None
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
    lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    return lib


class Nft:
    """Runs nft command text, in process when libnftables loads, else through the ``nft`` tool.

    ``backend`` forces one ("library" or "subprocess"); None picks the
    library when available.
    """

    def __init__(self, backend: str | None = None) -> None:
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._ctx: int | None = None
        if backend not in (None, "library", "subprocess"):
            raise ValueError(f"unknown nft backend {backend!r}")
        if backend != "subprocess":
            self._lib = _load()
            if self._lib is None and backend == "library":
                raise OSError(f"{LIBRARY} not found (install libnftables1)")
        if self._lib is not None:
            ctx = self._lib.nft_ctx_new(0)
            if not ctx:
                raise OSError("nft_ctx_new failed")
            self._ctx = ctx
            self._lib.nft_ctx_buffer_output(ctx)
            self._lib.nft_ctx_buffer_error(ctx)
        elif shutil.which("nft") is None:
            raise OSError("neither libnftables nor the nft tool is available (install nftables)")

    @property
    def backend(self) -> str:
        return "library" if self._ctx is not None else "subprocess"

    def run(self, commands: str, *, json_output: bool = False, terse: bool = False) -> str:
        """Run ``commands`` as one transaction; the output text (terse JSON with ``json_output``).

        ``terse`` (with ``json_output``): set elements left out (``OUT_TERSE``).
        """
        if "\0" in commands:
            raise NftError("NUL byte in nft input", commands=commands)
        with self._lock:
            if self._ctx is not None:
                return self._run_library(commands, json_output, terse)
            return self._run_tool(commands, json_output, terse)

    def run_json(self, commands: str, *, terse: bool = False) -> list[dict[str, Any]]:
        """Run a list command; the ``nftables`` array of its JSON output."""
        text = self.run(commands, json_output=True, terse=terse)
        if not text.strip():
            return []
        doc = json.loads(text)
        items = doc.get("nftables") if isinstance(doc, dict) else None
        if not isinstance(items, list):
            raise NftError(f"unexpected nft JSON output: {text[:200]!r}")
        return [item for item in items if isinstance(item, dict)]

    def _run_library(self, commands: str, json_output: bool, terse: bool = False) -> str:
        lib, ctx = self._lib, self._ctx
        assert lib is not None and ctx is not None
        flags = (_OUT_JSON | _OUT_TERSE | _OUT_HANDLE) if json_output else 0
        if json_output and terse:
            flags |= OUT_TERSE
        lib.nft_ctx_output_set_flags(ctx, flags)
        rc = lib.nft_run_cmd_from_buffer(ctx, commands.encode())
        out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
        err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
        if len(commands) > TRIM_ABOVE:
            heap.trim()
        if rc != 0:
            raise NftError(err or f"nft returned {rc}", commands=commands)
        return out

    def _run_tool(self, commands: str, json_output: bool, terse: bool = False) -> str:
        if json_output:
            # nft -j prints nothing for list commands read with -f: pass the one command as argv.
            if "\n" in commands.strip() or ";" in commands:
                raise NftError("one list command at a time with the nft tool", commands=commands)
            proc = subprocess.run(["nft", "-j", "-a", *(["-t"] if terse else []), *commands.split()],
                                  capture_output=True, text=True,
                                  timeout=300, check=False, start_new_session=True)
        else:
            proc = subprocess.run(["nft", "-f", "-"], input=commands, capture_output=True, text=True,
                                  timeout=300, check=False, start_new_session=True)
        if proc.returncode != 0:
            raise NftError(proc.stderr or f"nft exited {proc.returncode}", commands=commands)
        return proc.stdout

    def close(self) -> None:
        with self._lock:
            if self._ctx is not None and self._lib is not None:
                self._lib.nft_ctx_free(self._ctx)
            self._ctx = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()

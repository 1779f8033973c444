"""engine.native: C kernels are keyed by their source, local headers and flags, and load with typed functions."""
from __future__ import annotations

import ctypes
import shutil

import pytest

from engine import native

needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")


@needs_cc
def test_a_header_change_is_a_new_build_and_functions_are_typed(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(tmp_path / "cache"))
    src, header = tmp_path / "k.c", tmp_path / "k.h"
    header.write_text("#define SCALE 2\n")
    src.write_text('#include "k.h"\nvoid twice(int *x) { *x *= SCALE; }\n')
    first = native.build(src)
    assert first is not None and native.build(src) == first
    header.write_text("#define SCALE 3\n")
    second = native.build(src)
    assert second is not None and second != first  # the header is part of the key
    lib = native.load(src, {"twice": [ctypes.c_void_p]})
    x = ctypes.c_int(5)
    lib.twice(ctypes.addressof(x))
    assert x.value == 15 and lib.twice.restype is None


def test_disabled_by_env(tmp_path, monkeypatch):
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    src = tmp_path / "k.c"
    src.write_text("void f(void) {}\n")
    assert native.load(src, {"f": []}) is None

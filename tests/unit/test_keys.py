"""Cache keys: everything that changes a stage's output changes its key; nothing else does."""

from __future__ import annotations

import re

from pipeline.planning import keys


def build_key(**overrides):
    args = {"model_digest": "a" * 64, "target": '{"kind":"llvm"}', "opt_level": 3}
    args.update(overrides)
    return keys.key_of(keys.build_inputs(**args))


def test_build_key__is_64_hex_and_deterministic():
    assert re.fullmatch(r"[0-9a-f]{64}", build_key())
    assert build_key() == build_key()


def test_build_key__changes_with_model_target_opt_level():
    base = build_key()
    assert build_key(model_digest="b" * 64) != base
    assert build_key(target='{"kind":"llvm","mtriple":"aarch64-linux-gnu"}') != base
    assert build_key(opt_level=2) != base


def test_build_key__changes_with_tvm_version_and_code_version(monkeypatch):
    base = build_key()
    monkeypatch.setattr(keys, "tvm_version", lambda: "apache-tvm==9.9.9")
    assert build_key() != base
    monkeypatch.undo()
    monkeypatch.setattr(keys, "BUILD_CODE_VERSION", "999")
    assert build_key() != base


def test_build_key__includes_installed_tvm_version():
    assert "apache-tvm==0.27" in keys.build_inputs("a" * 64, "llvm", 3)["tvm"]


def test_keys__stages_never_collide():
    digest = "a" * 64
    assert keys.key_of(keys.import_inputs(digest)) != build_key(model_digest=digest)
    assert keys.key_of(keys.export_inputs(build_key(), "g++ 12")) != build_key()


def test_export_key__changes_with_build_and_toolchain():
    base = keys.key_of(keys.export_inputs("a" * 64, "g++ (Debian 12.2.0) 12.2.0"))
    assert keys.key_of(keys.export_inputs("b" * 64, "g++ (Debian 12.2.0) 12.2.0")) != base
    assert keys.key_of(keys.export_inputs("a" * 64, "aarch64-linux-gnu-gcc 12.2.0")) != base


def test_digest_json__ignores_key_order():
    assert keys.digest_json({"a": 1, "b": [1, 2]}) == keys.digest_json({"b": [1, 2], "a": 1})

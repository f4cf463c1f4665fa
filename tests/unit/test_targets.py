"""Target parsing: what users type -> a TVM 0.27 Target and its canonical string."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.errors import ExportError, TargetError
from pipeline.targets import check_opt_level, host_arch, parse_target, target_dict, toolchain_for


def test_target_dict__cli_forms():
    assert target_dict("llvm") == {"kind": "llvm"}
    assert target_dict("llvm -mtriple=aarch64-linux-gnu -mattr=+neon") == {
        "kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    assert target_dict("llvm -target=x86_64-pc-linux-gnu") == {"kind": "llvm", "mtriple": "x86_64-pc-linux-gnu"}
    assert target_dict("llvm -mattr=+avx2,+fma -num-cores=2") == {"kind": "llvm", "mattr": ["+avx2", "+fma"], "num-cores": 2}


def test_target_dict__quotes_group_and_are_removed():
    assert target_dict('llvm -mtriple="aarch64-linux-gnu" \'-mattr=+neon,+dotprod\'') == {
        "kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}
    assert target_dict('llvm -mcpu="" -opt=true -n=-2') == {"kind": "llvm", "mcpu": "", "opt": True, "n": -2}


@pytest.mark.parametrize(
    "text, match",
    [('llvm -mtriple="x', "cannot split"), ("llvm -=1", "options are -key=value"), ("llvm -kind=c", "first word"),
     ("{" + "[" * 100_000, "JSON is invalid"), ('{"kind": ' + "1" * 5000 + "}", "JSON is invalid")],
)
def test_target_dict__invalid_is_target_error(text, match):
    with pytest.raises(TargetError, match=match) as info:
        target_dict(text)
    assert len(str(info.value)) < 800


def test_parse_target__is_memoised():
    assert parse_target("llvm -mtriple=aarch64-linux-gnu") is parse_target("llvm -mtriple=aarch64-linux-gnu")


def test_parse_target__seed_string():
    info = parse_target("llvm -target=x86_64-pc-linux-gnu")
    assert json.loads(info.canonical)["mtriple"] == "x86_64-pc-linux-gnu"
    assert info.arch == "x86_64" and info.kind == "llvm"


def test_parse_target__aarch64_cli_and_json_agree():
    cli = parse_target("llvm -mtriple=aarch64-linux-gnu -mattr=+neon")
    js = parse_target('{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}')
    assert cli == js
    assert cli.arch == "aarch64" and cli.triple == "aarch64-linux-gnu"
    assert cli.tvm_target().kind.name == "llvm"


def test_parse_target__plain_llvm_gets_tvm_default_triple():
    info = parse_target("llvm")
    assert info.arch == host_arch()
    assert info.triple


def test_parse_target__native_cpu_becomes_host_cpu():
    import tvm

    info = parse_target("llvm -mcpu=native")
    assert json.loads(info.canonical)["mcpu"] == tvm.target.codegen.llvm_get_system_cpu()


def test_parse_target__canonical_is_stable_and_distinguishes_targets():
    assert parse_target("llvm").canonical == parse_target('{"kind": "llvm"}').canonical
    assert parse_target("llvm").canonical != parse_target("llvm -mtriple=aarch64-linux-gnu").canonical


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "empty"),
        ("llvm mtriple", "options are -key=value"),
        ("llvm -bogus=1", "Unknown config option"),
        ("notakind", "cannot use target"),
        ("{bad json", "JSON is invalid"),
        ('{"mtriple": "x"}', "kind"),
        ("llvm -mcpu=not-a-cpu", "does not know the CPU"),
        ("llvm -mattr=aaaa", "does not know the -mattr feature 'aaaa'"),
        ("llvm -mattr=avx2", "needs a sign"),
        ("llvm -mtriple=riscv64gc-linux-gnu", "no backend"),
        ("c", "not supported"),
    ],
)
def test_parse_target__invalid_is_target_error_with_examples(text, match):
    with pytest.raises(TargetError, match=match):
        parse_target(text)


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_check_opt_level__valid(level):
    assert check_opt_level(level) == level


@pytest.mark.parametrize("level", [-1, 4, True, "3"])
def test_check_opt_level__invalid_lists_choices(level):
    with pytest.raises(TargetError, match="0, 1, 2, 3"):
        check_opt_level(level)


def test_toolchain_for__host_and_cross():
    host = toolchain_for(parse_target("llvm"))
    assert not host.cross and host.compiler == "g++" and "g++" in host.identity
    aarch64 = parse_target("llvm -mtriple=aarch64-linux-gnu -mattr=+neon")
    if shutil.which("aarch64-linux-gnu-gcc"):
        tc = toolchain_for(aarch64)
        assert tc.cross and tc.compiler == "aarch64-linux-gnu-gcc"
    else:  # pragma: no cover - scripts/setup --dev installs it
        with pytest.raises(ExportError, match="gcc-aarch64-linux-gnu"):
            toolchain_for(aarch64)


def test_toolchain_for__missing_cross_compiler_names_package():
    with pytest.raises(ExportError, match="apt-get install gcc-riscv64-linux-gnu"):
        toolchain_for(parse_target("llvm -mtriple=riscv64-linux-gnu"))

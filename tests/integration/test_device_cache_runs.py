"""Kept libraries that went bad, through whole runs (the flow in this process; a full store through the CLI).

A kept copy overwritten in place or swapped with another is caught by its digest on a device that tells it
(the embedded one), also with ``--no-check``; on a stock rpc_server a swapped copy fails the run's check, is
forgotten and the run goes on with a fresh upload. Planted libraries are built here, never committed.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest
from support import cli_json, fill_disk, make_tiny_onnx, run_cli

from pipeline.device import EmbeddedServer


@pytest.fixture
def flow(prefect_api):
    """``resnet_remote`` in this process with the CLI's Prefect settings: a function of its parameters."""
    from flows._cli import cli_prefect_settings
    from flows.resnet_remote import resnet_remote

    def run(**params):
        with cli_prefect_settings():
            return resnet_remote(repeat=1, **params)

    return run


def kept_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("tvmrp-*.so"))


def planted_library(directory: Path, proof: Path, size: int) -> bytes:
    """A shared library whose constructor writes ``proof``, padded with zeros to ``size`` bytes."""
    source = directory / "planted.c"
    source.write_text(
        "#include <stdio.h>\n"
        f'__attribute__((constructor)) static void run(void) {{ FILE *f = fopen("{proof}", "w"); '
        'if (f) { fputs("ran", f); fclose(f); } }\n'
    )
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(directory / "planted.so"), str(source)], check=True)
    data = (directory / "planted.so").read_bytes()
    assert len(data) < size
    return data + b"\0" * (size - len(data))


def test_run__a_kept_library_overwritten_in_place_never_loads(flow, store_root, tiny_onnx, tmp_path, caplog):
    """The library kept in <store>/.device/ is overwritten in place (marker kept) by one whose constructor leaves
    proof, 16 KB against the library's 83 KB. The run checks size and digest before loading, forgets the copy,
    uploads again and passes; nothing planted runs. (One of the same size: test_device_cache.py.)"""
    first = flow(model=str(tiny_onnx), artifacts=str(store_root))
    [kept] = kept_files(store_root / ".device")
    proof = tmp_path / "proof-of-execution"
    with open(kept, "r+b") as f:  # in place: same inode, marker untouched
        f.write(planted_library(tmp_path, proof, 16_384))
        f.truncate()
    with caplog.at_level(logging.WARNING, logger="tasks.chains"):
        second = flow(model=str(tiny_onnx), artifacts=str(store_root))
    assert not proof.exists(), "the planted library ran"
    assert second.check.passed and not second.outcome.upload.reused and second.outcome.top5 == first.outcome.top5
    assert "holds 16,384 of the" in caplog.text and "forgotten" in caplog.text
    [fresh] = kept_files(store_root / ".device")
    assert fresh != kept and flow(model=str(tiny_onnx), artifacts=str(store_root)).outcome.upload.reused


@pytest.fixture
def two_models(tmp_path):
    """Two tiny models whose libraries have the same size and whose outputs differ."""
    return make_tiny_onnx(tmp_path / "a.onnx", seed=0), make_tiny_onnx(tmp_path / "b.onnx", seed=1)


def _swap(a: Path, b: Path) -> None:
    data_a, data_b = a.read_bytes(), b.read_bytes()
    assert len(data_a) == len(data_b)
    a.write_bytes(data_b)
    b.write_bytes(data_a)


def test_run__two_kept_libraries_swapped__caught_by_digest_even_with_no_check(flow, store_root, two_models):
    a, b = two_models
    runs = {model: flow(model=str(model), artifacts=str(store_root)) for model in (a, b)}
    assert runs[a].outcome.top5 != runs[b].outcome.top5
    _swap(*kept_files(store_root / ".device"))
    for model in (a, b):
        again = flow(model=str(model), artifacts=str(store_root), check=False)
        assert not again.outcome.upload.reused and again.outcome.top5 == runs[model].outcome.top5  # its own output
    assert flow(model=str(a), artifacts=str(store_root)).outcome.upload.reused  # kept again, healthy


def test_run__stock_server_swapped_copy_fails_the_check_then_is_forgotten_and_uploaded(flow, store_root, two_models,
                                                                                       tmp_path, caplog):
    """A stock rpc_server cannot tell a file's digest: a swapped kept copy loads, its output fails the check, the
    copy is forgotten and the run goes on once with a fresh upload (passing); the next run reuses that one."""
    a, b = two_models
    directory = tmp_path / "device"
    directory.mkdir()
    with EmbeddedServer(identify=False) as stock:
        host, port = stock.address
        device = {"host": host, "port": port, "device_cache": str(directory)}
        runs = {model: flow(model=str(model), artifacts=str(store_root), **device) for model in (a, b)}
        _swap(*kept_files(directory))
        with caplog.at_level(logging.WARNING, logger="tasks.chains"):
            again = flow(model=str(a), artifacts=str(store_root), **device)
        assert again.check.passed and not again.outcome.upload.reused and again.outcome.top5 == runs[a].outcome.top5
        assert "failed the check" in caplog.text and "forgotten" in caplog.text
        assert flow(model=str(a), artifacts=str(store_root), **device).outcome.upload.reused


@pytest.mark.slow
def test_cli__full_store_one_error_naming_the_disk_and_the_kept_copy_survives(prefect_api, small_disk, tiny_onnx,
                                                                              tmp_path):
    """The store, where the embedded device keeps its libraries, on a disk that fills up: the run that must
    upload ends with one Error line naming that disk, loads nothing short, and the library kept before is still
    found once space is freed."""
    disk = small_disk("4m")
    store, other = disk / "store", make_tiny_onnx(tmp_path / "other.onnx", seed=1)
    env = {"PREFECT_API_URL": prefect_api}
    assert cli_json(prefect_api, store, "--model", str(tiny_onnx))["upload"]["reused"] is False
    [kept] = kept_files(store / ".device")
    marker = (store / ".device" / "tvmrp-slot-0.json").read_bytes()
    built = run_cli("--model", str(other), "--artifacts", str(store), "--build-only", env=env)
    assert built.returncode == 0, built.stderr[-3000:]
    fill_disk(disk)
    failed = run_cli("--model", str(other), "--artifacts", str(store), "--no-check", env=env)
    errors = [line for line in failed.stderr.splitlines() if line.startswith("Error:")]
    assert failed.returncode == 1 and len(errors) == 1, failed.stderr[-3000:]
    assert f"that holds {store / '.device'} is full" in errors[0] and "Traceback" not in failed.stderr
    assert "file too short" not in failed.stderr and "Task run 'load'" not in failed.stderr  # nothing loaded
    assert kept_files(store / ".device") == [kept]
    assert (store / ".device" / "tvmrp-slot-0.json").read_bytes() == marker
    (disk / "filler").unlink()
    assert cli_json(prefect_api, store, "--model", str(tiny_onnx))["upload"]["reused"] is True

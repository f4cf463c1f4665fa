"""The TVM thread pool size given to the processes this project starts (pipeline/threads.py)."""

from __future__ import annotations

import os

from pipeline.threads import THREADS_ENV, default_threads_here, physical_cores, with_tvm_threads


def test_physical_cores__at_least_one_at_most_the_logical_cpus() -> None:
    assert 1 <= physical_cores() <= (os.cpu_count() or 1)


def test_with_tvm_threads__physical_cores_unless_the_user_sized_the_pool() -> None:
    assert with_tvm_threads({"PATH": "/bin"}) == {"PATH": "/bin", THREADS_ENV: str(physical_cores())}
    assert with_tvm_threads({THREADS_ENV: "3"}) == {THREADS_ENV: "3"}
    assert with_tvm_threads({"OMP_NUM_THREADS": "2"}) == {"OMP_NUM_THREADS": "2"}  # TVM's own fallback
    assert with_tvm_threads({THREADS_ENV: ""})[THREADS_ENV] == str(physical_cores())  # empty: not set


def test_default_threads_here__sets_this_process_only_when_unset(monkeypatch) -> None:
    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    default_threads_here()
    assert os.environ[THREADS_ENV] == str(physical_cores())
    monkeypatch.setenv(THREADS_ENV, "1")
    default_threads_here()
    assert os.environ[THREADS_ENV] == "1"

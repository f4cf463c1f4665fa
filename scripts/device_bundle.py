"""Pack what a device needs to serve TVM RPC: TVM's runtime only, the wheels it imports, and a start script.

    scripts/device-bundle [--python-version 3.11] [--platform manylinux_2_28_x86_64] [--cuda] [--out DIR] [--json]
                          [--tvm-version 0.27.0.post1]

The device then needs only a Python of that version (no compiler, no network, no apache-tvm install):

    tar -xJf tvmrp-device-cp311-x86_64.tar.xz && cd tvmrp-device-cp311-x86_64
    ./start-device.sh --host 0.0.0.0 --port 9090                  # or --tracker HOST:PORT --key KEY
    ./setup-device.sh [PYTHON]                                    # (done by start-device.sh on first use)

What goes in (``bundle.json`` lists it, with the sizes):

* ``runtime/tvm``: the host's installed ``tvm`` package (the ``apache-tvm`` wheel is ``py3-none``, one per
  CPU architecture; for another architecture, or another ``--tvm-version``, that wheel is downloaded) minus
  ``lib/libtvm_compiler.so`` (250 MB), ``3rdparty/``, ``include/``, ``src/``, ``web/``, ``lib64/`` and
  caches; without ``--cuda`` also minus ``lib/libtvm_runtime_cuda.so``. TVM falls back to its runtime-only
  mode without the compiler library (``TVM_USE_RUNTIME_LIB=1`` is set too). ``--tvm-version`` exists to make
  a device that differs from this machine on purpose (the version-skew tests); the bundle's name then ends
  in ``-tvm<version>``.
* ``runtime/tvmrp_device.py`` + ``runtime/sitecustomize.py`` (from ``pipeline/device/device_side/``): every
  Python process of the device registers ``tvmrp.device_info``, which tells the client the machine, the
  host name and the TVM, tvm-ffi and Python versions (a stock ``rpc_server`` tells none of these, a
  runtime-only one not even its architecture), and ``tvmrp.file_info``, the size and SHA-256 of a file there.
  The client checks the versions at session start (``pipeline.device.probe.check_versions``), the
  architecture before upload, and what an upload wrote and a kept library holds before loading it.
* ``wheels/``: for the device's Python and platform (``pip download --only-binary=:all:``), the host's
  versions of ``apache-tvm-ffi`` (exact: client and device must run the same FFI), ``numpy`` (imported by
  ``tvm.runtime``; when the host's version has no wheel for that Python, the newest ``>=host,<2``, else the
  newest), ``cloudpickle`` (``rpc_server``'s ``popen_worker``), ``psutil`` (stopping workers),
  ``typing_extensions`` (``apache-tvm-ffi``); with ``--cuda`` ``nvidia-cuda-runtime`` (``libcudart.so.13``
  of CUDA 13.0, what ``libtvm_runtime_cuda.so`` links against; the device brings the driver,
  ``libcuda.so.1``, 580 or newer). ``requirements.txt`` pins exactly these files.
* ``setup-device.sh``: makes ``venv/`` with the device's Python and installs the wheels from the bundle
  only (``--no-index``); without ``venv`` support it unpacks them into ``site/`` instead.
* ``start-device.sh``: ``python -m tvm.exec.rpc_server`` with ``PYTHONPATH=runtime`` and
  ``TVMRP_DEVICE_BUNDLE`` = the bundle's directory (``tvmrp_device`` reads ``bundle.json`` there), on the given
  address (``--port P --port-end P+1``) or registered with a tracker, supervised: started again (in a process
  group of its own, 1 s to 60 s apart) whenever it exits, which ``tvmrp_device`` makes it do when its listening
  thread died with a session (``TVMRP_DEVICE_SUPERVISED=1``; ``--once``: not); for CUDA with
  ``--load-library runtime/tvm/lib/libtvm_runtime_cuda.so`` (the server serves each session in a fresh
  interpreter, so the CUDA loader must be loaded there) and ``--no-fork`` (a forked session failed CUDA
  initialisation), and ``libcudart.so.13`` on ``LD_LIBRARY_PATH``. CUDA libraries must be built with
  ``pipeline.cuda.builder.compile_cuda`` (a cubin): a runtime-only device cannot JIT-compile CUDA source.

The result is ``OUT/<name>.tar.xz`` (``<name>`` = ``tvmrp-device-cp311-x86_64[-cuda]``), built in a
temporary directory and renamed into place. Downloads go through pip (its cache makes reruns fast).
:func:`assemble` writes the same tree into a directory without archiving it: the emulated aarch64 device
(``scripts/aarch64-device provision``) is provisioned that way.

Measured (apache-tvm 0.27.0.post1, Python 3.11, xz -6; ``--json`` prints the figures of each build):

    bundle                          archive   runtime/ + wheels/ (unpacked)   built in (2 loaded cores)
    tvmrp-device-cp311-x86_64       22.7 MB   13.3 MB + 20.6 MB               33 s
    tvmrp-device-cp311-aarch64      19.2 MB   12.9 MB + 17.3 MB               29 s
    tvmrp-device-cp311-x86_64-cuda  25.0 MB   13.8 MB + 22.8 MB               45 s
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / ".cache" / "device-bundles"
LAYOUT_VERSION = "3"  # 2: runtime/tvmrp_device.py + sitecustomize.py, TVMRP_DEVICE_BUNDLE; 3: supervised server
#: What the device runs so that it tells who it is (copied into ``runtime/``).
DEVICE_SIDE = REPO / "pipeline" / "device" / "device_side"
DEVICE_SIDE_FILES = ("tvmrp_device.py", "sitecustomize.py")
DOWNLOAD_TIMEOUT_S = 900.0

#: Paths inside the ``tvm`` package a runtime-only device never uses.
STRIP_DIRS = ("3rdparty", "include", "src", "web", "lib64")
STRIP_FILES = ("lib/libtvm_compiler.so",)
CUDA_FILES = ("lib/libtvm_runtime_cuda.so",)
#: What a runtime-only ``rpc_server`` imports (checked in a clean venv: tests/test_device_bundle.py).
HOST_PINNED = ("apache-tvm-ffi", "cloudpickle", "psutil", "typing_extensions")
CUDA_RUNTIME = ("nvidia-cuda-runtime", "13.0.96")  # = pipeline.cuda.builder.CUDA_PACKAGES; libcudart.so.13


sys.path.insert(0, str(Path(__file__).resolve().parent))  # _bundle_templates, also when loaded by path (tests)
from _bundle_templates import README, SETUP_SH, START_SH, render  # noqa: E402


class BundleError(Exception):
    """The bundle cannot be built; the message says why and what to do."""


# ------------------------------------------------------------------------------------------ platforms


def host_platform() -> str:
    import platform

    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    return f"manylinux_2_28_{machine}"


def platform_arch(platform_tag: str) -> str:
    match = re.fullmatch(r"(?:manylinux_\d+_\d+|manylinux\d+|linux)_(x86_64|aarch64|armv7l|ppc64le|s390x)", platform_tag)
    if not match:
        raise BundleError(
            f"--platform {platform_tag!r} is not a Linux wheel platform such as manylinux_2_28_x86_64 or "
            f"manylinux_2_28_aarch64"
        )
    return match.group(1)


def compatible_platforms(platform_tag: str) -> list[str]:
    """``manylinux_2_28_x86_64`` -> it and every older manylinux tag of that arch (pip takes them literally)."""
    arch = platform_arch(platform_tag)
    match = re.fullmatch(r"manylinux_2_(\d+)_\w+", platform_tag)
    newest = int(match.group(1)) if match else 17
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(newest, 4, -1)]
    tags += [f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}"]
    return [platform_tag] + [t for t in tags if t != platform_tag]


def python_tag(version: str) -> str:
    if not re.fullmatch(r"3\.\d+", version):
        raise BundleError(f"--python-version {version!r} must look like 3.11 or 3.12")
    return "cp" + version.replace(".", "")


# ------------------------------------------------------------------------------------------- downloads


def _pip_download(requirements: list[str], dest: Path, python_version: str, platform_tag: str) -> list[Path] | None:
    """``pip download`` wheels (no dependencies) for the device: one per requirement, in order; None when one
    of them has no wheel for that Python and platform."""
    abi = python_tag(python_version)
    argv = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--progress-bar", "off",
            "--no-deps", "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
            "--abi", abi, "--abi", "abi3", "--abi", "none", "--dest", str(dest)]
    for tag in compatible_platforms(platform_tag):
        argv += ["--platform", tag]
    try:
        proc = subprocess.run([*argv, *requirements], capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BundleError(f"pip download {' '.join(requirements)} took longer than {DOWNLOAD_TIMEOUT_S:.0f} s") from None
    if proc.returncode != 0:
        if "No matching distribution" in proc.stderr or "Could not find a version" in proc.stderr:
            return None
        raise BundleError(f"pip download {' '.join(requirements)} failed: {proc.stderr.strip()[-600:]}")
    # pip names each file it saved or found already there: "Saved <path>" / "File was already downloaded <path>".
    reported = [Path(m) for m in re.findall(r"(?:Saved|File was already downloaded) (\S+\.whl)", proc.stdout)]
    wheels = []
    for requirement in requirements:
        name = _canonical(re.split(r"[=<>!~ ;\[]", requirement, maxsplit=1)[0])
        found = [w for w in reported if _canonical(w.name.split("-")[0]) == name]
        if not found:
            raise BundleError(f"pip download {requirement} reported success but named no wheel:\n{proc.stdout[-600:]}")
        wheels.append(found[-1])
    return wheels


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _host_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        raise BundleError(f"{dist} is not installed on this machine: run scripts/setup") from None


def download_wheels(dest: Path, python_version: str, platform_tag: str, cuda: bool, log) -> list[Path]:
    pinned = [f"{dist}=={_host_version(dist)}" for dist in HOST_PINNED]
    if cuda:
        pinned.append("{}=={}".format(*CUDA_RUNTIME))
    wheels = _pip_download(pinned, dest, python_version, platform_tag)
    if wheels is None:
        missing = [r for r in pinned if _pip_download([r], dest, python_version, platform_tag) is None]
        raise BundleError(
            f"no wheel of {', '.join(missing) or ' '.join(pinned)} exists for Python {python_version} on "
            f"{platform_tag}: the device must run the host's apache-tvm-ffi (the RPC protocol must match)"
        )
    numpy_host = _host_version("numpy")
    for requirement in (f"numpy=={numpy_host}", f"numpy>={numpy_host},<2", "numpy"):
        found = _pip_download([requirement], dest, python_version, platform_tag)
        if found is not None:
            if requirement != f"numpy=={numpy_host}":
                log(f"device-bundle: numpy {numpy_host} has no wheel for Python {python_version}: using {found[0].name}")
            return wheels + found
    raise BundleError(f"no numpy wheel exists for Python {python_version} on {platform_tag}")


# ------------------------------------------------------------------------------------------- runtime


def _keep(relative: str, cuda: bool) -> bool:
    """Whether ``relative`` (a path inside the ``tvm`` package, with ``/``) belongs on a runtime-only device."""
    parts = relative.split("/")
    if "__pycache__" in parts or relative.endswith((".pyc", ".pyo")):
        return False
    if parts[0] in STRIP_DIRS:
        return False
    if relative in STRIP_FILES or (not cuda and relative in CUDA_FILES):
        return False
    return True


def installed_tvm() -> Path:
    spec = importlib.util.find_spec("tvm")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise BundleError("the tvm package is not installed on this machine: run scripts/setup")
    return Path(locations[0])


def copy_runtime(
    dest: Path, cuda: bool, platform_tag: str, downloads: Path, log, tvm_version: str | None = None
) -> str:
    """Write the runtime-only ``tvm`` package to ``dest/tvm``; returns where it came from.

    The host's installed package when it is of ``tvm_version`` (default: the host's) and the platform's
    architecture; else the ``apache-tvm==<tvm_version>`` wheel for the platform, downloaded.
    """
    import platform as _platform

    host_version = _host_version("apache-tvm")
    version = tvm_version or host_version
    host_arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(_platform.machine().lower(), _platform.machine().lower())
    if platform_arch(platform_tag) == host_arch and version == host_version:
        source = installed_tvm()
        for path in sorted(source.rglob("*")):
            relative = path.relative_to(source).as_posix()
            if path.is_dir() or not _keep(relative, cuda):
                continue
            target = dest / "tvm" / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        return f"installed apache-tvm=={version} ({source})"
    log(f"device-bundle: downloading the apache-tvm=={version} wheel for {platform_tag} (its runtime only is kept)")
    # The wheel is py3-none: any Python version matches it.
    found = _pip_download([f"apache-tvm=={version}"], downloads, "3.11", platform_tag)
    if found is None:
        raise BundleError(f"no apache-tvm=={version} wheel exists for {platform_tag}")
    wheel = found[0]
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            name = info.filename
            if not name.startswith("tvm/") or name.endswith("/") or ".." in name.split("/"):
                continue
            if not _keep(name[len("tvm/"):], cuda):
                continue
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            mode = (info.external_attr >> 16) & 0o777
            target.chmod(mode or 0o644)
    return f"{wheel.name} (downloaded)"


def copy_device_side(dest: Path) -> None:
    """``tvmrp_device.py`` and the ``sitecustomize.py`` that activates it, into ``dest`` (the PYTHONPATH dir)."""
    for name in DEVICE_SIDE_FILES:
        source = DEVICE_SIDE / name
        if not source.is_file():
            raise BundleError(f"{source} is missing: the checkout is incomplete")
        shutil.copy2(source, dest / name)


# ------------------------------------------------------------------------------------------- scripts

def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def bundle_name(python_version: str, platform_tag: str, cuda: bool, tvm_version: str | None = None) -> str:
    """``tvmrp-device-cp311-x86_64[-cuda]``; ``-tvm<version>`` added when ``tvm_version`` is not the host's."""
    name = f"tvmrp-device-{python_tag(python_version)}-{platform_arch(platform_tag)}{'-cuda' if cuda else ''}"
    if tvm_version and tvm_version != _host_version("apache-tvm"):
        name += f"-tvm{tvm_version}"
    return name


def check_tvm_version(version: str) -> str:
    if not re.fullmatch(r"\d+\.\d+(\.\d+)?([.-]?(post|rc|dev)\d*)?", version):
        raise BundleError(f"--tvm-version {version!r} must be an apache-tvm release such as 0.27.0.post1")
    return version


def assemble(
    root: Path,
    python_version: str,
    platform_tag: str,
    cuda: bool,
    log=print,
    tvm_version: str | None = None,
    downloads: Path | None = None,
) -> dict:
    """Write the bundle's tree into the new directory ``root`` (not archived); returns what ``bundle.json`` says.

    Args:
        downloads: Where pip's downloads go (kept); a temporary directory if None.
    """
    tvm_version = tvm_version or _host_version("apache-tvm")
    name = bundle_name(python_version, platform_tag, cuda, tvm_version)
    (root / "runtime").mkdir(parents=True)
    (root / "wheels").mkdir()
    with contextlib.ExitStack() as stack:
        if downloads is None:
            downloads = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".downloads-", dir=root.parent)))
        downloads.mkdir(parents=True, exist_ok=True)
        source = copy_runtime(root / "runtime", cuda, platform_tag, downloads, log, tvm_version)
        copy_device_side(root / "runtime")
        wheels = download_wheels(downloads, python_version, platform_tag, cuda, log)
        for wheel in wheels:
            shutil.copy2(wheel, root / "wheels" / wheel.name)
    requirements = []
    for wheel in wheels:
        dist, version = wheel.name.split("-")[:2]
        requirements.append(f"{dist}=={version}")
    (root / "requirements.txt").write_text("\n".join(requirements) + "\n")
    pyver = python_version
    major, minor = pyver.split(".")
    cuda_note = ", CUDA 13 (libtvm_runtime_cuda.so; the device needs an NVIDIA driver 580+)" if cuda else ""
    values = {"PYVER": pyver, "PYMAJ": major, "PYMIN": minor, "TVM": tvm_version, "PLATFORM": platform_tag,
              "CUDA": "1" if cuda else "0", "CUDA_NOTE": cuda_note}
    for script, template in (("setup-device.sh", SETUP_SH), ("start-device.sh", START_SH)):
        (root / script).write_text(render(template, values))
        (root / script).chmod(0o755)
    (root / "README.txt").write_text(README.format(name=name, tvm=tvm_version, pyver=pyver,
                                                   platform=platform_tag, cuda_note=cuda_note))
    info = {
        "layout": LAYOUT_VERSION,
        "name": name,
        "python": pyver,
        "platform": platform_tag,
        "cuda": cuda,
        "tvm": tvm_version,
        "tvm_source": source,
        "requirements": requirements,
        "runtime_bytes": _size(root / "runtime"),
        "wheel_bytes": {w.name: w.stat().st_size for w in wheels},
        "start": "./start-device.sh --host 0.0.0.0 --port 9090",
    }
    (root / "bundle.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def build_bundle(
    python_version: str, platform_tag: str, cuda: bool, out: Path, log=print, level: int = 6,
    tvm_version: str | None = None,
) -> dict:
    """Build ``out/<name>.tar.xz``; returns what ``bundle.json`` says plus ``archive`` and ``archive_bytes``."""
    started = time.monotonic()
    name = bundle_name(python_version, platform_tag, cuda, tvm_version)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=out) as work_text:
        work = Path(work_text)
        root = work / name
        info = assemble(root, python_version, platform_tag, cuda, log, tvm_version, downloads=work / "downloads")
        archive_tmp = work / f"{name}.tar.xz"
        _write_archive(root, archive_tmp, level)
        archive = out / f"{name}.tar.xz"
        os.replace(archive_tmp, archive)
    info["archive"] = str(archive)
    info["archive_bytes"] = archive.stat().st_size
    info["unpacked_bytes"] = info["runtime_bytes"] + sum(info["wheel_bytes"].values())
    info["seconds"] = round(time.monotonic() - started, 1)
    return info


def _write_archive(root: Path, archive: Path, level: int = 6) -> None:
    """``tar -cJf`` with xz on all cores when the tools are there, else Python's tarfile (one core).

    Most bytes are wheels (already compressed): -6 is 0.5 MB smaller than -1 and 6x slower (27 s vs 4.5 s on
    2 cores for the CPU x86_64 bundle).
    """
    if shutil.which("tar") and shutil.which("xz"):
        env = {**os.environ, "XZ_OPT": f"-{level} -T0"}
        proc = subprocess.run(["tar", "-C", str(root.parent), "--owner=0", "--group=0", "--numeric-owner",
                               "-cJf", str(archive), root.name], capture_output=True, text=True, env=env, timeout=1800)
        if proc.returncode == 0:
            return
        with contextlib.suppress(OSError):
            archive.unlink()
    with tarfile.open(archive, "w:xz", preset=level) as tar:
        tar.add(root, arcname=root.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/device-bundle", description=__doc__.splitlines()[0])
    parser.add_argument("--python-version", default=f"{sys.version_info[0]}.{sys.version_info[1]}",
                        help="the device's Python, e.g. 3.12 (default: this Python's)")
    parser.add_argument("--platform", default=host_platform(),
                        help="the device's wheel platform: manylinux_2_28_x86_64 (default here) or manylinux_2_28_aarch64")
    parser.add_argument("--cuda", action="store_true", help="add TVM's CUDA runtime and libcudart (NVIDIA GPUs)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where the .tar.xz goes (default {DEFAULT_OUT})")
    parser.add_argument("--xz-level", type=int, choices=range(10), default=6, metavar="0-9",
                        help="xz compression level (default 6; 1 is 6x faster and 2%% larger)")
    parser.add_argument("--tvm-version", metavar="VERSION",
                        help="the apache-tvm release the device runs (default: this machine's); another one makes a "
                             "device that differs on purpose, e.g. to try the version-skew check")
    parser.add_argument("--json", action="store_true", help="print the bundle's description as JSON")
    args = parser.parse_args(argv)
    log = (lambda message: print(message, file=sys.stderr)) if args.json else print
    try:
        python_tag(args.python_version)
        platform_arch(args.platform)
        if args.tvm_version is not None:
            check_tvm_version(args.tvm_version)
        info = build_bundle(args.python_version, args.platform, args.cuda, args.out.resolve(), log, args.xz_level,
                            args.tvm_version)
    except BundleError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        mb = 1e6
        print(f"device-bundle: {info['archive']}: {info['archive_bytes'] / mb:.1f} MB "
              f"(unpacked {info['unpacked_bytes'] / mb:.1f} MB: runtime {info['runtime_bytes'] / mb:.1f} MB + "
              f"{len(info['wheel_bytes'])} wheels {sum(info['wheel_bytes'].values()) / mb:.1f} MB) in {info['seconds']} s")
        print(f"device-bundle: on the device: tar -xJf {Path(info['archive']).name} && "
              f"{info['name']}/start-device.sh --host 0.0.0.0 --port 9090")
    return 0


if __name__ == "__main__":
    sys.exit(main())

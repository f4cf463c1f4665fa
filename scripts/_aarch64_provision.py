"""Provisioning of the emulated aarch64 device (``scripts/aarch64-device provision``): see aarch64_device.py.

A private apt (arm64 lists, its own status; the host's dpkg untouched) downloads Debian's arm64 Python 3.11
and its libraries, ``dpkg-deb -x`` unpacks them into a sysroot, the aarch64 device bundle
(``scripts/device_bundle.py``: TVM's runtime only, the wheels it imports, ``tvmrp_device``) is assembled into
the sysroot's ``/opt/tvmrp-device`` with its wheels unpacked into its ``site/`` (what its setup-device.sh
does on a board without ``venv``), and ``bin/python3`` runs that interpreter under ``qemu-aarch64-static``
with the environment the bundle's start-device.sh sets. Built in a temporary directory and renamed into
place under a lock; ``provisioned.json`` is the stamp.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import device_bundle  # scripts/device_bundle.py: this directory is sys.path[0] of scripts/aarch64_device.py

REPO = Path(__file__).resolve().parents[1]
SUITE = "bookworm"  # Debian 12: Python 3.11, the version of apache-tvm's cp311 wheels
APT_SOURCES = Path("/etc/apt/sources.list.d")
APT_SOURCE_LIST = Path("/etc/apt/sources.list")
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# The interpreter, its standard library, and the C++ runtime of TVM's libraries; apt adds the dependencies.
ROOT_PACKAGES = ("python3.11-minimal", "libpython3.11-stdlib", "libstdc++6")
# Pulled in by the resolver (an empty dpkg status means "nothing installed") but never used by Python.
SKIP_PACKAGES = frozenset({"dpkg", "tar"})
# Host versions are used for these (the bundle pins them), so that client and device run the same TVM.
PINNED_FROM_HOST = ("apache-tvm", *device_bundle.HOST_PINNED, "numpy")
BUNDLE_PYTHON = "3.11"
BUNDLE_PLATFORM = "manylinux_2_28_aarch64"
WHEEL_PLATFORMS = tuple(device_bundle.compatible_platforms(BUNDLE_PLATFORM))
BUNDLE_DIR = "opt/tvmrp-device"  # inside the sysroot, where a board would unpack the bundle
QEMU_BINARIES = ("qemu-aarch64-static", "qemu-aarch64")
QEMU_PACKAGE = "qemu-user-static"
LAYOUT_VERSION = "2"  # bump when the sysroot is built differently; 2: from the device bundle (runtime only)
# Under emulation the runtime-only `import tvm` takes ~11 s (the full wheel's ~17 s), and rpc_server imports
# it twice (server and popen_worker).
SMOKE_TIMEOUT_S = 300.0
DOWNLOAD_TIMEOUT_S = 900.0
SITECUSTOMIZE = '''"""Start-up of the emulated aarch64 Python (written by scripts/aarch64-device provision)."""
import os
import sys

# The host cannot execute this aarch64 interpreter itself (no binfmt_misc): whatever Python starts with
# sys.executable (TVM's popen_worker, multiprocessing) must go through the qemu wrapper instead.
_wrapper = os.environ.get("TVMRP_AARCH64_PYTHON")
if _wrapper:
    sys.executable = sys._base_executable = _wrapper
'''


class DeviceScriptError(Exception):
    """Provisioning or starting failed; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Where the emulated device lives (from the environment, see scripts/aarch64_device.py)."""

    home: Path
    run_dir: Path

    @classmethod
    def from_env(cls) -> Config:
        home = Path(os.environ.get("TVMRP_AARCH64_DIR") or REPO / ".cache" / "aarch64").resolve()
        run_dir = Path(os.environ.get("TVMRP_AARCH64_RUN_DIR") or home / "run").resolve()
        return cls(home, run_dir)

    @property
    def sysroot(self) -> Path:
        return self.home / "sysroot"

    @property
    def bundle(self) -> Path:
        """The device bundle's tree (runtime/, site/, bundle.json) inside the sysroot."""
        return self.sysroot / BUNDLE_DIR

    @property
    def python(self) -> Path:
        """The wrapper that runs the aarch64 Python under qemu; pass it where a Python is expected."""
        return self.home / "bin" / "python3"

    @property
    def stamp(self) -> Path:
        return self.home / "provisioned.json"

    def pidfile(self, name: str) -> Path:
        return self.run_dir / f"{name}.json"

    def log(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"


@dataclasses.dataclass(frozen=True)
class Provisioned:
    """What ``provision`` produced (also the content of ``provisioned.json``)."""

    spec: dict
    packages: list[str]
    wheels: list[str]
    deb_bytes: int
    wheel_bytes: int
    sysroot_bytes: int
    seconds: float
    machine: str
    triple: str
    tvm_version: str
    python: str
    bundle: str
    bundle_bytes: int
    identity: dict

    def summary(self) -> str:
        mb = 1e6
        return (
            f"aarch64 sysroot ready: Python for {self.machine} ({self.triple}), TVM {self.tvm_version} runtime only "
            f"from the device bundle {self.bundle}\n"
            f"  downloads: {len(self.packages)} Debian packages {self.deb_bytes / mb:.0f} MB, "
            f"{len(self.wheels)} wheels {self.wheel_bytes / mb:.0f} MB; sysroot {self.sysroot_bytes / mb:.0f} MB "
            f"on disk (the bundle {self.bundle_bytes / mb:.0f} MB of it); built in {self.seconds:.0f} s\n"
            f"  interpreter: {self.python}"
        )


def _spec() -> dict:
    """Everything that decides the sysroot's content: a different one rebuilds it."""
    wheels = []
    for name in PINNED_FROM_HOST:
        try:
            wheels.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            wheels.append(name)
    device_side = hashlib.sha256()
    for name in device_bundle.DEVICE_SIDE_FILES:
        with contextlib.suppress(OSError):
            device_side.update(name.encode() + b"\0" + (device_bundle.DEVICE_SIDE / name).read_bytes())
    return {
        "layout": LAYOUT_VERSION,
        "suite": SUITE,
        "packages": list(ROOT_PACKAGES),
        "skip": sorted(SKIP_PACKAGES),
        "wheels": wheels,
        "platforms": list(WHEEL_PLATFORMS),
        "bundle_layout": device_bundle.LAYOUT_VERSION,
        "device_side": device_side.hexdigest()[:16],
    }


def read_stamp(cfg: Config) -> Provisioned | None:
    """The record of the last complete provisioning, or None."""
    try:
        return Provisioned(**json.loads(cfg.stamp.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def provision(cfg: Config, refresh: bool = False, log=print) -> tuple[Provisioned, bool]:
    """Make sure the sysroot and its wrapper exist and run; idempotent.

    Returns:
        The provisioning record and whether anything was built (False: it was up to date).

    Raises:
        DeviceScriptError: A tool or download failed, or the emulated Python does not import TVM.
    """
    spec = _spec()
    current = read_stamp(cfg)
    if not refresh and _is_current(cfg, current, spec):
        return current, False
    cfg.home.mkdir(parents=True, exist_ok=True)
    with locked(cfg.home / "provision.lock"):
        current = read_stamp(cfg)  # another process may have finished while we waited
        if not refresh and _is_current(cfg, current, spec):
            return current, False
        return _build(cfg, spec, log), True


def _is_current(cfg: Config, stamp: Provisioned | None, spec: dict) -> bool:
    return (
        stamp is not None and stamp.spec == spec and cfg.python.is_file()
        and (cfg.sysroot / "usr" / "bin" / "python3.11").is_file()
        and (cfg.bundle / "site" / ".tvmrp-installed").is_file() and _qemu() is not None
    )


def _build(cfg: Config, spec: dict, log) -> Provisioned:
    started = time.monotonic()
    cfg.stamp.unlink(missing_ok=True)
    qemu = _ensure_qemu(log)
    packages = _download_debs(cfg, log)
    tmp = Path(tempfile.mkdtemp(prefix="sysroot.tmp-", dir=cfg.home))
    try:
        log(f"aarch64: unpacking {len(packages)} packages into the sysroot")
        for deb in packages:
            _run(["dpkg-deb", "-x", str(deb), str(tmp)], f"unpack {deb.name}", timeout=300)
        _relativise_symlinks(tmp)
        bundle, wheels = _install_bundle(cfg, tmp / BUNDLE_DIR, log)
        site = tmp / "usr" / "lib" / "python3" / "dist-packages"
        site.mkdir(parents=True, exist_ok=True)
        # Debian's sitecustomize is an absolute link into /etc of the *host*: ours replaces it. The bundle's
        # own sitecustomize (first on PYTHONPATH) runs this one after it.
        (tmp / "usr" / "lib" / "python3.11" / "sitecustomize.py").unlink(missing_ok=True)
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        old = cfg.home / f"sysroot.old-{os.getpid()}"
        if cfg.sysroot.exists():
            cfg.sysroot.rename(old)
        tmp.rename(cfg.sysroot)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _write_wrapper(cfg, qemu)
    log("aarch64: checking the emulated Python (one emulated `import tvm`, runtime only: 5-20 s)")
    identity = _smoke(cfg)
    record = Provisioned(
        spec=spec,
        packages=sorted(p.name for p in packages),
        wheels=sorted(w.name for w in wheels),
        deb_bytes=sum(p.stat().st_size for p in packages),
        wheel_bytes=sum(w.stat().st_size for w in wheels),
        sysroot_bytes=_du(cfg.sysroot),
        seconds=round(time.monotonic() - started, 1),
        machine=identity["machine"],
        triple=identity["triple"],
        tvm_version=identity["tvm"],
        python=str(cfg.python),
        bundle=bundle["name"],
        bundle_bytes=_du(cfg.bundle),
        identity=identity,
    )
    tmp_stamp = cfg.stamp.with_suffix(".tmp")
    tmp_stamp.write_text(json.dumps(dataclasses.asdict(record), indent=1))
    tmp_stamp.replace(cfg.stamp)
    return record


def _qemu() -> str | None:
    for name in QEMU_BINARIES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _ensure_qemu(log) -> str:
    qemu = _qemu()
    if qemu:
        return qemu
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise DeviceScriptError(
            f"qemu-user is missing: install it (Debian/Ubuntu: sudo apt-get install {QEMU_PACKAGE}) and run again"
        )
    log(f"aarch64: installing {QEMU_PACKAGE} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "update", "-qq"], "apt-get update", timeout=DOWNLOAD_TIMEOUT_S, env=env)
    _run(["apt-get", "install", "-y", "-qq", QEMU_PACKAGE], f"apt-get install {QEMU_PACKAGE}",
         timeout=DOWNLOAD_TIMEOUT_S, env=env)
    qemu = _qemu()
    if not qemu:
        raise DeviceScriptError(f"{QEMU_PACKAGE} was installed but none of {', '.join(QEMU_BINARIES)} is on PATH")
    return qemu


def _host_debian_sources() -> list[str]:
    """The host's own Debian archive entries (``URI SUITE COMPONENTS``) for this suite, reused for arm64.

    Read from the machine's apt configuration (deb822 ``*.sources`` and one-line ``sources.list``), so the
    device comes from the same mirror the host already uses.
    """
    lines: list[str] = []
    for path in sorted(APT_SOURCES.glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields = {}
            for raw in stanza.splitlines():
                if raw.strip() and not raw.lstrip().startswith("#") and ":" in raw:
                    name, value = raw.split(":", 1)
                    fields[name.strip().lower()] = value.strip()
            if fields.get("types", "").split()[:1] != ["deb"] or fields.get("enabled", "yes") == "no":
                continue
            for uri in fields.get("uris", "").split():
                for suite in fields.get("suites", "").split():
                    if suite.startswith(SUITE):
                        lines.append(f"{uri} {suite} {fields.get('components', 'main')}")
    for path in [APT_SOURCE_LIST, *sorted(APT_SOURCES.glob("*.list"))]:
        if path.is_file():
            for raw in path.read_text().splitlines():
                words = re.sub(r"\[[^\]]*\]", " ", raw).split() if raw.startswith("deb ") else []
                if len(words) >= 4 and words[2].startswith(SUITE):
                    lines.append(" ".join(words[1:]))
    if not lines:
        raise DeviceScriptError(f"no Debian {SUITE} entry in this machine's apt sources ({APT_SOURCES})")
    return lines


def _apt_options(cfg: Config) -> list[str]:
    """A private apt for arm64: its own sources, lists and status, so the host's apt and dpkg stay as they are."""
    apt = cfg.home / "apt"
    for sub in ("lists/partial", "archives/partial", "sources.list.d", "preferences.d"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "status").touch()
    if not KEYRING.is_file():
        raise DeviceScriptError(f"{KEYRING} is missing: apt-get install debian-archive-keyring")
    (apt / "sources.list").write_text(
        "".join(f"deb [arch=arm64 signed-by={KEYRING}] {line}\n" for line in _host_debian_sources())
    )
    settings = {
        "APT::Architecture": "arm64",
        "APT::Architectures::": "arm64",
        "Dir::State": apt,
        "Dir::State::Lists": apt / "lists",
        "Dir::State::status": apt / "status",
        "Dir::Cache": apt,
        "Dir::Cache::archives": apt / "archives",
        "Dir::Etc::SourceList": apt / "sources.list",
        "Dir::Etc::SourceParts": apt / "sources.list.d",
        "Dir::Etc::Preferences": apt / "preferences",
        "Dir::Etc::PreferencesParts": apt / "preferences.d",
        "Debug::NoLocking": "1",
        "APT::Sandbox::User": "root" if os.geteuid() == 0 else "",
        "Acquire::Languages": "none",
    }
    return [arg for name, value in settings.items() if value != "" for arg in ("-o", f"{name}={value}")]


def _download_debs(cfg: Config, log) -> list[Path]:
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise DeviceScriptError("apt-get and dpkg-deb are needed to fetch Debian's arm64 Python (Debian/Ubuntu host)")
    options = _apt_options(cfg)
    log(f"aarch64: apt-get update (Debian {SUITE}, arm64 lists, private to {cfg.home / 'apt'})")
    _run(["apt-get", *options, "update", "-qq"], "apt-get update (arm64)", timeout=DOWNLOAD_TIMEOUT_S)
    plan = _run(["apt-get", *options, "install", "-s", "--no-install-recommends", *ROOT_PACKAGES],
                "apt-get install -s (arm64)", timeout=120)
    names = [line.split()[1] for line in plan.splitlines() if line.startswith("Inst ")]
    names = [name for name in names if name.split(":")[0] not in SKIP_PACKAGES]
    if not names:
        raise DeviceScriptError(f"apt resolved no packages for {' '.join(ROOT_PACKAGES)}:\n{plan[-2000:]}")
    debs = cfg.home / "debs"
    debs.mkdir(exist_ok=True)
    missing = [name for name in names if not _deb_of(debs, name)]
    if missing:
        log(f"aarch64: downloading {len(missing)} of {len(names)} arm64 packages")
        _run(["apt-get", *options, "download", *(f"{name}:arm64" for name in missing)],
             "apt-get download (arm64)", timeout=DOWNLOAD_TIMEOUT_S, cwd=debs)
    found = [_deb_of(debs, name) for name in names]
    absent = [name for name, path in zip(names, found, strict=True) if path is None]
    if absent:
        raise DeviceScriptError(f"apt-get download did not fetch: {', '.join(absent)}")
    return [path for path in found if path is not None]


def _deb_of(directory: Path, name: str) -> Path | None:
    found = sorted(directory.glob(f"{name}_*_arm64.deb")) + sorted(directory.glob(f"{name}_*_all.deb"))
    return found[-1] if found else None


def _pip_platform_args() -> list[str]:
    args = ["--only-binary=:all:", "--python-version", BUNDLE_PYTHON, "--implementation", "cp",
            "--abi", device_bundle.python_tag(BUNDLE_PYTHON), "--abi", "abi3", "--abi", "none"]
    for platform in WHEEL_PLATFORMS:
        args += ["--platform", platform]
    return args


def _install_bundle(cfg: Config, root: Path, log) -> tuple[dict, list[Path]]:
    """The aarch64 device bundle, assembled at ``root`` with its wheels unpacked into ``root/site``.

    What the bundle's setup-device.sh does on a board without ``venv``, done here by the host's pip (no
    emulation). Downloads are kept in ``<home>/wheels``.

    Returns:
        The bundle's ``bundle.json`` content, and the wheels downloaded for it (the apache-tvm one included).
    """
    downloads = cfg.home / "wheels"
    log(f"aarch64: assembling the device bundle for {BUNDLE_PLATFORM} (TVM's runtime only) into the sysroot")
    try:
        info = device_bundle.assemble(root, BUNDLE_PYTHON, BUNDLE_PLATFORM, False, log, downloads=downloads)
    except device_bundle.BundleError as exc:
        raise DeviceScriptError(f"the aarch64 device bundle: {exc}") from None
    site = root / "site"
    site.mkdir()
    _run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps", "--no-index",
          "--find-links", str(root / "wheels"), "--target", str(site), *_pip_platform_args(),
          "-r", str(root / "requirements.txt")],
         "pip install --target (the bundle's aarch64 wheels)", timeout=600)
    # Console scripts pip wrote for the host's Python: useless (and misleading) on the device.
    shutil.rmtree(site / "bin", ignore_errors=True)
    (site / ".tvmrp-installed").touch()
    used = {name for name in info["wheel_bytes"]}
    tvm_wheel = f"apache_tvm-{info['tvm']}-"
    wheels = [w for w in sorted(downloads.glob("*.whl")) if w.name in used or
              (w.name.startswith(tvm_wheel) and "aarch64" in w.name)]
    return info, wheels


def _relativise_symlinks(root: Path) -> None:
    """Absolute links (``/lib/ld-linux-aarch64.so.1 -> /lib/aarch64-linux-gnu/...``) would point into the host."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            link = Path(dirpath) / name
            if link.is_symlink():
                target = os.readlink(link)
                if target.startswith("/"):
                    link.unlink()
                    link.symlink_to(os.path.relpath(root / target.lstrip("/"), link.parent))


def _write_wrapper(cfg: Config, qemu: str) -> None:
    cfg.python.parent.mkdir(parents=True, exist_ok=True)
    q = shlex.quote
    bundle = cfg.bundle
    text = f"""#!/bin/sh
# Python 3.11 for aarch64 (Debian {SUITE}) under qemu-user; written by scripts/aarch64-device provision.
# The environment is the one the device bundle's start-device.sh sets: its runtime-only TVM and its wheels
# (site/) on PYTHONPATH, its sitecustomize (tvmrp.device_info) first.
export TVMRP_AARCH64_PYTHON={q(str(cfg.python))}
export PYTHONNOUSERSITE=1
export PYTHONPATH={q(f"{bundle / 'runtime'}:{bundle / 'site'}")}
export TVMRP_DEVICE_BUNDLE={q(str(bundle))}
export TVM_USE_RUNTIME_LIB=1
unset PYTHONHOME PYTHONSTARTUP LD_LIBRARY_PATH LD_PRELOAD VIRTUAL_ENV
exec {q(qemu)} -L {q(str(cfg.sysroot))} {q(str(cfg.sysroot / 'usr' / 'bin' / 'python3.11'))} "$@"
"""
    tmp = cfg.python.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    tmp.replace(cfg.python)


def _smoke(cfg: Config) -> dict:
    """One emulated ``import tvm``: runtime only, ``tvmrp.device_info`` registered, the qemu ``sys.executable``.

    Returns:
        What ``tvmrp.device_info`` answers there.
    """
    code = ("import json, sys, tvm, tvm_ffi; "
            "print(json.dumps([sys.executable, tvm_ffi.get_global_func('tvmrp.device_info')()]))")
    out = _run([str(cfg.python), "-c", code], "the emulated Python (import tvm)", timeout=SMOKE_TIMEOUT_S)
    executable, answer = json.loads(out.strip().splitlines()[-1])
    identity = json.loads(answer)
    if identity.get("machine") != "aarch64":
        raise DeviceScriptError(f"the emulated Python reports machine {identity.get('machine')!r}, not aarch64")
    if executable != str(cfg.python):  # the sysroot's sitecustomize did not run after the bundle's
        raise DeviceScriptError(f"the emulated Python's sys.executable is {executable!r}, not {cfg.python}")
    if not identity.get("runtime_only") or not identity.get("bundle") or not identity.get("tvm"):
        raise DeviceScriptError(f"the emulated device does not run the bundle's runtime-only TVM: {identity}")
    return identity


def _du(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += (Path(dirpath) / name).lstat().st_size
    return total


def _run(argv: list[str], what: str, timeout: float, cwd: Path | None = None, env: dict | None = None) -> str:
    """Runs a command with a time limit; returns its stdout. Raises DeviceScriptError with its output's tail."""
    try:
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise DeviceScriptError(f"{what} did not finish within {timeout:.0f} s") from None
    except OSError as exc:
        raise DeviceScriptError(f"{what} could not run: {exc}") from None
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        lines = "\n".join(f"    {line}" for line in tail)
        raise DeviceScriptError(f"{what} failed (exit {proc.returncode}):\n{lines}")
    return proc.stdout


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Holds an exclusive lock on ``path`` (created if needed) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield

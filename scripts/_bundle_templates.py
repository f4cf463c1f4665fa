"""The files a device bundle carries besides the runtime and the wheels: setup-device.sh, start-device.sh and
README.txt (``scripts/device_bundle.py`` fills them in with :func:`render`)."""

from __future__ import annotations

SETUP_SH = r"""#!/bin/sh
# Install what this TVM device bundle needs, from the bundle only (no network): ./setup-device.sh [PYTHON]
# Makes venv/ with PYTHON (default: python3; must be Python @PYVER@) and pip-installs wheels/ into it; where
# the venv module is missing (Debian without python3-venv) it unpacks the wheels into site/ instead.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
python=${1:-${PYTHON:-python3}}
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (@PYMAJ@, @PYMIN@))' 2>/dev/null; then
  echo "Error: this bundle is for Python @PYVER@; $python is $("$python" -V 2>&1 || echo missing). Give one: ./setup-device.sh /path/to/python@PYVER@" >&2
  exit 2
fi
if [ -f "$here/venv/.tvmrp-installed" ] || [ -f "$here/site/.tvmrp-installed" ]; then
  exit 0
fi
if "$python" -m venv "$here/venv.tmp" >/dev/null 2>&1; then
  (
    # Only the bundle's wheels: no index, and none of this machine's pip settings (constraints, links).
    unset PIP_CONSTRAINT PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_REQUIRE_VIRTUALENV PIP_TARGET PIP_PREFIX
    export PIP_CONFIG_FILE=/dev/null
    "$here/venv.tmp/bin/python" -m pip install --disable-pip-version-check -q --no-index --no-deps \
      --find-links "$here/wheels" -r "$here/requirements.txt"
  )
  touch "$here/venv.tmp/.tvmrp-installed"
  rm -rf "$here/venv"
  mv "$here/venv.tmp" "$here/venv"
  echo "setup-device: installed the bundle's wheels into $here/venv"
else
  rm -rf "$here/venv.tmp" "$here/site.tmp"
  "$python" - "$here" <<'EOF'
import pathlib, shutil, sys, zipfile
here = pathlib.Path(sys.argv[1])
site = here / "site.tmp"
site.mkdir()
for wheel in sorted((here / "wheels").glob("*.whl")):
    zipfile.ZipFile(wheel).extractall(site)
for data in site.glob("*.data"):
    for kind in ("purelib", "platlib"):
        for item in (data / kind).glob("*") if (data / kind).is_dir() else ():
            shutil.move(str(item), str(site / item.name))
    shutil.rmtree(data)
for path in site.rglob("*.so*"):
    path.chmod(0o755)
EOF
  touch "$here/site.tmp/.tvmrp-installed"
  rm -rf "$here/site"
  mv "$here/site.tmp" "$here/site"
  echo "setup-device: no venv module in $python: unpacked the bundle's wheels into $here/site"
fi
"""

START_SH = r"""#!/bin/sh
# A TVM RPC device from this bundle (TVM @TVM@ runtime only, Python @PYVER@, @PLATFORM@@CUDA_NOTE@).
#
#   ./start-device.sh [--host 0.0.0.0] [--port 9090] [--tracker HOST:PORT --key KEY] [--python PYTHON] [--once]
#                     [--libraries DIR | --no-libraries] [-- EXTRA rpc_server ARGS]
#
# Keeps the libraries clients upload in --libraries DIR (default: libraries/ here; made private, mode 700)
# between sessions and restarts, and tells clients so (tvmrp.device_info): their --device-cache auto keeps an
# unchanged library there instead of sending it again. --no-libraries: keep none.
#
# Runs python -m tvm.exec.rpc_server in the foreground and starts it again when it exits (after 1 s, doubling
# up to 60 s; back to 1 s after a minute of service): a server whose session process died stops serving (its
# listening thread dies with it; runtime/tvmrp_device.py then ends it), and would otherwise stay up, unreachable,
# out of its tracker. --once: run it once, exit with its code. Stop with Ctrl-C or SIGTERM to this script (each
# server runs in a process group of its own, ended with it). Installs the bundle's wheels first when that was
# not done yet (./setup-device.sh).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
host=0.0.0.0
port=9090
tracker=
key=
once=0
libraries=$here/libraries
python=${PYTHON:-python3}
cuda=@CUDA@
while [ $# -gt 0 ]; do
  case "$1" in
    --host) host=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --tracker) tracker=$2; shift 2 ;;
    --key) key=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    --once) once=1; shift ;;
    --libraries) libraries=$2; shift 2 ;;
    --no-libraries) libraries=; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "start-device: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -n "$tracker" ] && [ -z "$key" ]; then
  echo "start-device: --tracker needs --key (the device key clients ask the tracker for)" >&2
  exit 2
fi
if [ ! -f "$here/venv/.tvmrp-installed" ] && [ ! -f "$here/site/.tvmrp-installed" ]; then
  "$here/setup-device.sh" "$python"
fi
if [ -f "$here/venv/.tvmrp-installed" ]; then
  python="$here/venv/bin/python"
  PYTHONPATH="$here/runtime"
else
  PYTHONPATH="$here/runtime:$here/site"
fi
export PYTHONPATH
# runtime/sitecustomize.py makes every Python process of the device register tvmrp.device_info (who it is) and
# tvmrp.file_info (what a file it holds is); tvmrp_device reads bundle.json from here, and under this
# supervisor ends a server whose listening thread died.
export TVMRP_DEVICE_BUNDLE="$here"
export TVMRP_DEVICE_SUPERVISED=1
if [ -n "$libraries" ]; then
  # Only this user may write it: a client loads a kept library only under a marker it authenticated, and a
  # directory others can write is no place to keep one (tvmrp_device reports none then).
  mkdir -p "$libraries" && chmod 700 "$libraries"
  TVMRP_DEVICE_LIBRARY_CACHE=$(cd "$libraries" && pwd -P)
  export TVMRP_DEVICE_LIBRARY_CACHE
else
  unset TVMRP_DEVICE_LIBRARY_CACHE
fi
# TVM's thread pool takes half the logical CPUs on x86-64 (two hardware threads per core assumed): where each
# core runs one thread (most VMs) that idles half the cores. One thread per physical core, counted from sysfs,
# unless TVM_NUM_THREADS or OMP_NUM_THREADS is set.
if [ -z "${TVM_NUM_THREADS:-}" ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
  cores=$(cat /sys/devices/system/cpu/cpu[0-9]*/topology/thread_siblings_list 2>/dev/null | sort -u | wc -l)
  if [ "${cores:-0}" -gt 0 ]; then
    export TVM_NUM_THREADS="$cores"
  fi
fi
export TVM_USE_RUNTIME_LIB=1
export PYTHONUNBUFFERED=1
export PYTHONNOUSERSITE=1
set -- --host "$host" --port "$port" --port-end $((port + 1)) "$@"
if [ -n "$tracker" ]; then
  set -- "$@" --tracker "$tracker" --key "$key"
fi
if [ "$cuda" = 1 ]; then
  cudart=$("$python" -c 'import importlib.metadata as m; print(m.distribution("nvidia-cuda-runtime").locate_file("nvidia/cu13/lib"))')
  LD_LIBRARY_PATH="$cudart${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export LD_LIBRARY_PATH
  if ! "$python" -c 'import ctypes; ctypes.CDLL("libcuda.so.1")' 2>/dev/null; then
    echo "start-device: no NVIDIA driver here (libcuda.so.1 does not load): install the driver (580 or newer, CUDA 13)" >&2
    exit 2
  fi
  set -- "$@" --load-library "$here/runtime/tvm/lib/libtvm_runtime_cuda.so" --no-fork
fi

server=
pause=
stopping=0
stop() {
  stopping=1
  if [ -n "$server" ]; then
    kill -TERM "-$server" 2>/dev/null || kill -TERM "$server" 2>/dev/null
  fi
  [ -n "$pause" ] && kill "$pause" 2>/dev/null
  return 0
}
trap stop INT TERM HUP
set +e
delay=1
while :; do
  started=$(date +%s)
  # A process group of its own (pgid = its pid): what it leaves behind (its popen_worker holds the port, its
  # sessions) is ended with it before the next one starts.
  "$python" -c 'import os, sys; os.setpgid(0, 0); os.execv(sys.executable, [sys.executable, "-m", "tvm.exec.rpc_server", *sys.argv[1:]])' "$@" &
  server=$!
  [ "$stopping" = 1 ] && kill -TERM "$server" 2>/dev/null
  code=0
  while kill -0 "$server" 2>/dev/null; do
    wait "$server"
    code=$?
  done
  kill -KILL "-$server" 2>/dev/null
  server=
  [ "$stopping" = 1 ] && exit 0
  [ "$once" = 1 ] && exit "$code"
  [ $(($(date +%s) - started)) -ge 60 ] && delay=1
  echo "start-device: rpc_server exited (code $code); starting it again in $delay s" >&2
  sleep "$delay" &
  pause=$!
  wait "$pause" 2>/dev/null
  pause=
  [ "$stopping" = 1 ] && exit 0
  delay=$((delay * 2 > 60 ? 60 : delay * 2))
done
"""

README = """TVM RPC device bundle: {name}

TVM {tvm} runtime only (no compiler), for Python {pyver} on {platform}{cuda_note}.

  ./start-device.sh --host 0.0.0.0 --port 9090           serve directly (clients: --host THIS --port 9090);
                                                         started again whenever it exits (--once: not)
  ./start-device.sh --tracker HOST:9190 --key my-device  register with a tracker
  ./setup-device.sh [PYTHON]                             install the wheels (start-device.sh does it once)

libraries/ keeps the libraries clients upload, between runs and restarts: an unchanged library is not sent
again (--libraries DIR elsewhere, --no-libraries for none).

Nothing is downloaded: setup-device.sh installs wheels/ (requirements.txt) into venv/ with --no-index.
Contents and sizes: bundle.json. Built by tvm-remote-pipeline's scripts/device-bundle.
"""


def render(template: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        template = template.replace(f"@{key}@", value)
    return template

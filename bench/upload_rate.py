"""Why a library's upload over TVM RPC runs at a fraction of a socket's speed, and what chunking or compression
would buy: measured on a real rpc_server on 127.0.0.1.

    .venv/bin/python bench/upload_rate.py LIBRARY [--repeats 3] [--json FILE]

Rows: ``remote.upload`` of the whole file (one RPC call) and the CPU it costs this process and the device's
processes; the same bytes in chunks of 1, 4 and 16 MB (one
``remote.upload`` per chunk, to separate files: what a chunked upload would cost per byte); the bytes as a
tensor copied to the device (TVM's CopyToRemote path); a plain loopback socket copy; and for zlib (levels 1 and
6) and lzma (preset 0) the compressed size, the time to compress here and to decompress (the device's side,
measured here), and the upload time they would give at the measured upload rate. Figures go to
docs/performance.md#uploads.
"""

from __future__ import annotations

import argparse
import json
import lzma
import statistics
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project (bench/ itself is already first)

from bench import _socket_copy


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cpu(processes: list) -> float:
    """User + system CPU seconds of ``processes`` so far (those that ended count 0)."""
    total = 0.0
    for proc in processes:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("library", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import tvm
    from tvm import rpc

    from pipeline.device import EmbeddedServer

    data = bytearray(args.library.read_bytes())  # what remote.upload sends (it reads a file into one too)
    size = len(data)
    rows: dict[str, dict[str, float]] = {}

    def row(name: str, seconds: float, sent: int = size) -> None:
        rows[name] = {"seconds": seconds, "mb_per_s": sent / 1e6 / seconds}
        print(f"{name:<40} {seconds * 1e3:9.1f} ms  {sent / 1e6 / seconds:8.1f} MB/s", flush=True)

    with EmbeddedServer() as server:
        host, port = server.address
        remote = rpc.connect(host, port, session_timeout=600)
        row("remote.upload, one call", _median(lambda: remote.upload(data, f"whole-{time.perf_counter_ns()}.so"),
                                                  args.repeats))
        device = psutil.Process().children(recursive=True)  # the rpc_server, its popen_worker, the session
        client_cpu, device_cpu = time.process_time(), _cpu(device)
        remote.upload(data, "cpu.so")
        cpu = {"client_s": time.process_time() - client_cpu, "device_s": _cpu(device) - device_cpu}
        rows["cpu of one upload"] = cpu
        print(f"{'cpu of one upload':<40} client {cpu['client_s'] * 1e3:.0f} ms, device processes "
              f"{cpu['device_s'] * 1e3:.0f} ms", flush=True)
        for chunk in (1 << 20, 4 << 20, 16 << 20):
            def chunked(chunk: int = chunk) -> None:
                for i in range(0, size, chunk):
                    remote.upload(data[i:i + chunk], f"part-{time.perf_counter_ns()}-{i}")
            row(f"remote.upload, {chunk >> 20} MB calls", _median(chunked, args.repeats))
        weights = np.frombuffer(data, dtype=np.uint8)
        dev = remote.cpu()
        row("tensor copy to the device", _median(lambda: tvm.runtime.tensor(weights, dev), args.repeats))
    row("plain loopback socket copy", statistics.median(_socket_copy(data) for _ in range(args.repeats)))
    rate = rows["remote.upload, one call"]["mb_per_s"] * 1e6
    codecs = {"zlib 1": (lambda b: zlib.compress(b, 1), zlib.decompress),
              "zlib 6": (lambda b: zlib.compress(b, 6), zlib.decompress),
              "lzma 0": (lambda b: lzma.compress(b, preset=0), lzma.decompress)}
    compression = {}
    for name, (pack, unpack) in codecs.items():
        packed = pack(bytes(data))
        pack_s = _median(lambda pack=pack: pack(bytes(data)), 1)
        unpack_s = _median(lambda unpack=unpack, packed=packed: unpack(packed), 1)
        total = pack_s + len(packed) / rate + unpack_s
        compression[name] = {"ratio": size / len(packed), "bytes": len(packed), "compress_s": pack_s,
                             "decompress_s": unpack_s, "upload_s_at_measured_rate": total}
        print(f"{name:<8} {size / len(packed):5.2f}x  compress {pack_s * 1e3:7.0f} ms  decompress "
              f"{unpack_s * 1e3:6.0f} ms  => {total * 1e3:7.0f} ms (vs {size / rate * 1e3:.0f} ms uncompressed)",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps({"bytes": size, "rows": rows, "compression": compression}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

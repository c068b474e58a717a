"""Shared fixtures: one local Ray cluster per test session, one moto S3 server on loopback, tiny specs."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

# farm.train.stacked_triton's kernels compile for a GPU; without one, tests run them through Triton's interpreter
# (read when a kernel is defined, so before any test imports the module)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the smallest spec that still exercises every role: digits, 2 epochs, 7 models
TINY_SPEC = {
    "name": "tiny",
    "seed": 3,
    "dataset": {"name": "digits", "test_fraction": 0.2, "val_fraction": 0.5},
    "forget": {"kind": "random", "fraction": 0.1},
    "model": {"arch": "small-cnn", "width": 4},
    "training": {"epochs": 2, "batch_size": 128, "lr": 0.05},
    "counts": {"original": 1, "retrain": 2, "shadow": 2},
    "unlearn": [{"method": "finetune", "count": 2, "hparams": {"lr": 0.01, "epochs": 1}}],
    "queries": ["plain", "shift:1,0"],
}


@pytest.fixture
def one_thread():
    """torch on one thread for the test (the same bits from run to run), as before it afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 with a free port; the standard AWS variables point at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def bucket(s3_server, request):
    import boto3

    name = "b-" + request.node.name.lower().replace("_", "-")[:50]
    boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_address():
    """One 2-CPU local Ray cluster for the whole session; CLI subprocesses join it through RAY_ADDRESS.

    Drivers forward no credentials to Ray workers (only the endpoint and other non-secret settings), so the
    cluster's workers find the moto server's dummy credentials in their own environment, set here before
    Ray starts, as the workers of a real cluster find theirs (instance role, profile, environment)."""
    import ray

    dummy = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    saved = {k: os.environ.get(k) for k in dummy}
    for k, v in dummy.items():
        os.environ.setdefault(k, v)
    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def tiny_spec_file(tmp_path):
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_SPEC))
    return path


def ufarm(*args, env=None, timeout=300, **kw) -> subprocess.CompletedProcess:
    """Run the ufarm CLI in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "farm.cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=kw.get("cwd", REPO))


def report_files(folder: str) -> dict:
    """A report folder's files as compared across runs: report.json without its seconds, report.md without
    its "computed in" line, Parquet files as tables, the rest as bytes."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = {}
    for name in sorted(os.listdir(folder)):
        data = open(os.path.join(folder, name), "rb").read()
        if name == "report.json":
            out[name] = {k: v for k, v in json.loads(data).items() if k != "seconds"}
        elif name == "report.md":
            out[name] = [line for line in data.decode().splitlines() if "computed in" not in line]
        elif name.endswith(".parquet"):
            out[name] = pq.read_table(pa.BufferReader(data))
        else:
            out[name] = data
    return out


def assert_same_report(a: dict, b: dict):
    """Two report_files are the same to the bit, file by file."""
    import pyarrow as pa

    assert sorted(a) == sorted(b)
    for name in a:
        if isinstance(a[name], pa.Table):
            assert a[name].equals(b[name]), name
        else:
            assert a[name] == b[name], name


class CountingFS:
    """The local file system, counting the bytes handed out by the files opened with open_input_file (the one
    call a projected read makes); every other call goes to the local file system."""

    def __init__(self):
        import pyarrow.fs as pafs

        self.local, self.read = pafs.LocalFileSystem(), 0

    def __getattr__(self, name):
        return getattr(self.local, name)

    def open_input_file(self, path):
        import io

        import pyarrow as pa

        handler, inner = self, self.local.open_input_file(path)

        class Counting(io.RawIOBase):
            def readinto(self, buf):
                data = inner.read(len(buf))
                handler.read += len(data)
                buf[: len(data)] = data
                return len(data)

            def seek(self, pos, whence=0):
                return inner.seek(pos, whence)

            def tell(self):
                return inner.tell()

            def readable(self):
                return True

            def seekable(self):
                return True

        return pa.PythonFile(Counting(), mode="r")

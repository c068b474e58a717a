"""Fault injection against the store: S3 throttling answered with retries, nothing lost or rewritten."""
import copy
import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest

from farm.cli import main
from farm.store import RunStore
from tests.conftest import TINY_SPEC

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class ThrottlingProxy:
    """Forwards S3 requests to the moto server, answering the first `throttle` PUTs with 503 SlowDown."""

    def __init__(self, upstream: str, throttle: int):
        self.upstream = urlparse(upstream)
        self.remaining = throttle
        self.throttled = 0
        self.puts = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", ""):  # decode HTTP chunking
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self):
                body = self._body()
                if self.command == "PUT":
                    with proxy.lock:
                        proxy.puts += 1
                        throttle = proxy.remaining > 0
                        if throttle:
                            proxy.remaining -= 1
                            proxy.throttled += 1
                    if throttle:
                        self.send_response(503)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length", str(len(SLOW_DOWN)))
                        self.end_headers()
                        self.wfile.write(SLOW_DOWN)
                        return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():  # HEAD keeps the upstream length: it is the object's size
                    if k.lower() not in ("transfer-encoding", "connection") and \
                            (self.command == "HEAD" or k.lower() != "content-length"):
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()


@pytest.fixture
def throttling_proxy(s3_server, monkeypatch):
    proxy = ThrottlingProxy(s3_server["AWS_ENDPOINT_URL"], throttle=5)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    yield proxy
    proxy.close()


def test_s3_throttling_is_retried_and_nothing_is_lost(bucket, throttling_proxy, tmp_path):
    import yaml

    spec = copy.deepcopy(TINY_SPEC)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    uri = f"s3://{bucket}/throttled"
    assert main(["run", str(path), "--store", uri, "--executor", "local", "--no-progress"]) == 0
    assert throttling_proxy.throttled == 5 and throttling_proxy.puts > 5
    store = RunStore(uri)
    assert len(store.intact_models()) == 7
    store.read_conf()  # every checksum verifies
    # a second run over the same throttling endpoint rewrites nothing
    before = {m: mk["sha256"] for m, mk in store.markers().items()}
    throttling_proxy.remaining = 3
    assert main(["run", str(path), "--store", uri, "--executor", "local", "--no-progress"]) == 0
    assert {m: mk["sha256"] for m, mk in store.markers().items()} == before


class _Planted:
    """A pickle that runs code when unpickled without weights_only (what a poisoned weights file holds)."""

    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return (open, (self.flag, "w"))


def test_planted_weights_never_run_code(tmp_path, monkeypatch):
    import hashlib
    import io
    import os

    import torch

    from farm.run import prepare_run, run_local
    from farm.spec import spec_from_dict

    raw = copy.deepcopy(TINY_SPEC)
    raw["counts"] = {"original": 1}
    raw["unlearn"][0]["count"] = 1
    uri = str(tmp_path / "run")
    spec = spec_from_dict({**raw, "unlearn": []})
    assert not run_local(prepare_run(spec, uri), progress=False).failed  # the original, with its weights
    # torch's escape hatch that turns the unsafe default back on, as an old torch or a user's setting would:
    # only an explicit weights_only=True at the call keeps the planted file from running
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    flag = tmp_path / "ran"
    buf = io.BytesIO()
    torch.save({"state": _Planted(str(flag))}, buf)
    store = RunStore(uri)
    store.write_bytes("weights/original-00000.pt", buf.getvalue())
    # an adversary who can write the store rewrites the marker's checksum too, so torch.load is reached
    marker = store.read_json("models/original-00000.json")
    marker.update(weights_sha256=hashlib.sha256(buf.getvalue()).hexdigest(), weights_bytes=len(buf.getvalue()))
    store.write_json("models/original-00000.json", marker)
    result = run_local(prepare_run(spec_from_dict(raw), uri), progress=False)
    assert not os.path.exists(flag)  # nothing ran
    assert len(result.failed) == 1  # the unlearned model failed to load its parent instead

"""Where a store's bytes live and how they get there: the S3 filesystem from the environment's settings,
retries of throttling and transient errors with jittered back-off, S3 URI checks, and `StoreFiles`, the
atomic file primitives under one root that the layout (farm.store.run_store) is built on."""
from __future__ import annotations

import json
import logging
import os
import random
import time
import uuid
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from farm.settings import Settings

from .layout import LEASE, TMP_TAG, TOKEN, StoreError, first_line, json_default

log = logging.getLogger("ufarm")
TRANSIENT = ("SLOW_DOWN", "SlowDown", "Throttl", "503", "RequestTimeout", "InternalError", "ServiceUnavailable")
# Back-off jitter changes when a retry happens, never what is written: hundreds of actors throttled at once
# must not retry in lockstep. Seeded per process so a run's timing is as reproducible as its scheduling.
_JITTER = random.Random(os.getpid())


def backoff_seconds(attempt: int) -> float:
    """Full-jitter exponential back-off: uniform in [0, min(8, 0.25 * 2**attempt)] seconds."""
    return _JITTER.uniform(0.0, min(8.0, 0.25 * 2 ** attempt))


def s3_filesystem(settings: Settings | None = None) -> tuple[pafs.S3FileSystem, str]:
    """An S3 filesystem from the environment's settings, with bounded retries and timeouts so an
    unreachable endpoint fails in seconds instead of retrying for minutes."""
    s = settings or Settings.from_env()
    kwargs = dict(region=s.region, connect_timeout=s.s3_connect_timeout, request_timeout=s.s3_request_timeout,
                  retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=s.s3_attempts))
    if s.s3_endpoint:
        parsed = urlparse(s.endpoint_url)
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
    return pafs.S3FileSystem(**kwargs), s.s3_endpoint or "AWS S3"


def s3_client(settings: Settings | None = None):
    """A boto3 S3 client with the same endpoint, region, timeouts and retries as s3_filesystem."""
    import boto3  # only the S3 lease needs it
    from botocore.config import Config

    s = settings or Settings.from_env()
    config = Config(connect_timeout=s.s3_connect_timeout, read_timeout=s.s3_request_timeout,
                    retries={"max_attempts": s.s3_attempts, "mode": "standard"})
    return boto3.client("s3", endpoint_url=s.endpoint_url, region_name=s.region, config=config)


def retry_transient(fn, what: str):
    """Call fn, retrying S3 throttling and transient server errors with jittered exponential back-off (on
    top of the SDK's own few attempts, which a sustained SlowDown outlasts). Other errors pass at once."""
    attempts = Settings.from_env().s3_retries
    for attempt in range(attempts):
        try:
            return fn()
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) or not any(t in str(exc) for t in TRANSIENT) \
                    or attempt == attempts - 1:
                raise
            delay = backoff_seconds(attempt)
            log.warning("%s: %s; retrying in %.2f s", what, first_line(exc), delay)
            time.sleep(delay)


def client_error_code(exc) -> tuple[str, int]:
    resp = getattr(exc, "response", None) or {}
    return str(resp.get("Error", {}).get("Code", "")), int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def precondition_failed(exc) -> bool:
    code, status = client_error_code(exc)
    return status == 412 or code == "PreconditionFailed"


def boto_retry(fn, what: str):
    """Like retry_transient, for boto3 calls (throttling, 5xx and conflicting conditional writes are
    retried with the same back-off; other errors pass through at once)."""
    from botocore.exceptions import ClientError  # only the S3 lease needs boto3

    attempts = Settings.from_env().s3_retries
    for attempt in range(attempts):
        try:
            return fn()
        except ClientError as exc:
            code, status = client_error_code(exc)
            transient = status in (409, 500, 502, 503, 504) or any(t in code for t in TRANSIENT) \
                or code == "ConditionalRequestConflict"
            if not transient or attempt == attempts - 1:
                raise
            delay = backoff_seconds(attempt)
            log.warning("%s: %s; retrying in %.2f s", what, code or status, delay)
            time.sleep(delay)


def check_s3_uri(uri: str) -> None:
    """S3 keys are literal strings: an empty, '.' or '..' component, or a '#' or '?' (which a URI parser
    takes for a fragment or a query), would make the store write one key and list another."""
    rest = uri.split("://", 1)[1]
    for ch in "#?":
        if ch in rest:
            raise StoreError(f"store URI {uri!r} contains {ch!r}; S3 bucket and prefix components must not "
                             "contain '#' or '?'")
    for part in rest.rstrip("/").split("/"):
        if part in ("", ".", ".."):
            raise StoreError(f"store URI {uri!r} has the path component {part!r}; S3 bucket and prefix "
                             "components must not be empty, '.' or '..'")



class StoreFiles:
    """Files under one root (a local folder or an S3 prefix), written atomically: a reader sees the old
    state or the whole file (locally a temporary name in the same folder, renamed; on S3 one PUT)."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/") if uri != "/" else uri
        parsed = urlparse(uri)
        self.is_s3 = parsed.scheme == "s3"
        # a per-instance token: names this writer's temporaries and its lease
        self.token = uuid.uuid4().hex[:16]
        self._tmp_token: str | None = None
        self._lease_depth = 0  # > 0 while this instance holds the store's lease (farm.store.run_store)
        if self.is_s3:
            if not parsed.netloc:
                raise StoreError(f"store URI {uri!r} names no bucket; use s3://bucket/prefix")
            check_s3_uri(uri)
            self.fs, self.endpoint = s3_filesystem()
            self.bucket = parsed.netloc
            self.root = f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
        elif parsed.scheme in ("", "file"):
            path = parsed.path if parsed.scheme == "file" else uri
            self.fs, self.endpoint = pafs.LocalFileSystem(), None
            self.root = os.path.abspath(os.path.expanduser(path))
        else:
            raise StoreError(f"store URI {uri!r} has scheme {parsed.scheme!r}; use a local path, file:// or s3://")

    # ------------------------------------------------------------------------------------ primitives
    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def check_reachable(self) -> None:
        """Fail early and clearly: an unreachable endpoint, a missing bucket, or a local path that is a file."""
        if self.is_s3:
            try:
                info = self.fs.get_file_info(self.bucket)
            except OSError as exc:
                raise StoreError(f"cannot reach the S3 store {self.uri} at {self.endpoint}: {first_line(exc)}") from None
            if info.type == pafs.FileType.NotFound:
                raise StoreError(f"S3 bucket {self.bucket!r} does not exist at {self.endpoint} (store {self.uri})")
        elif os.path.exists(self.root) and not os.path.isdir(self.root):
            raise StoreError(f"store path {self.root} exists and is not a folder")

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def _temporary_token(self) -> str:
        """The token in this writer's temporary names: the lease's when a run holds one (so a run's Ray
        workers name theirs as the run does, and the run's cleanup finds them), else this instance's."""
        if self._tmp_token is None:
            token = None
            if not self._lease_depth:
                try:
                    with open(os.path.join(self.root, LEASE), "rb") as fh:
                        token = json.loads(fh.read()).get("token")
                except (OSError, ValueError, AttributeError):
                    token = None
            self._tmp_token = token if isinstance(token, str) and TOKEN.fullmatch(token) else self.token
        return self._tmp_token

    def write_bytes(self, rel: str, data: bytes | pa.Buffer) -> None:
        """Atomic from a reader's point of view (see the class docstring). data: any bytes-like object."""
        target = self.path(rel)
        if self.is_s3:
            def put():
                with self.fs.open_output_stream(target) as out:
                    out.write(data)
            return retry_transient(put, f"writing {self.uri}/{rel}")
        folder = os.path.dirname(target)
        os.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/{TMP_TAG}{self._temporary_token()}-{uuid.uuid4().hex[:8]}-{os.path.basename(target)}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)  # atomic: a reader sees the old state or the whole file

    def read_bytes(self, rel: str) -> bytes:
        def get():
            with self.fs.open_input_file(self.path(rel)) as fh:
                return fh.read()
        try:
            return retry_transient(get, f"reading {self.uri}/{rel}") if self.is_s3 else get()
        except FileNotFoundError:
            raise StoreError(f"{self.uri}/{rel} does not exist") from None

    def write_json(self, rel: str, obj: dict) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=json_default).encode())

    def read_json(self, rel: str) -> dict:
        return json.loads(self.read_bytes(rel))

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self.path(rel))
        except FileNotFoundError:
            pass

    def list_dir(self, rel: str) -> list[pafs.FileInfo]:
        """Files directly under a folder of the store, without temporaries; [] when the folder is absent."""
        return [i for i in self.entries(rel) if i.type == pafs.FileType.File]

    def entries(self, rel: str) -> list[pafs.FileInfo]:
        """Files and folders directly under a folder of the store, without temporaries."""
        selector = pafs.FileSelector(self.path(rel), allow_not_found=True)
        return [i for i in self.fs.get_file_info(selector) if not i.base_name.startswith(TMP_TAG)]

    def remove_temporaries(self, token: str | None = None) -> int:
        """Delete the temporaries of one writer (default: this one; a dead run's when its lease is taken
        over), never another's: a live run's in-flight files stay. Local stores only; S3 has none."""
        if self.is_s3:
            return 0
        prefix = f"{TMP_TAG}{token or self.token}-"
        removed = 0
        for sub in ("", "logits", "models", "weights", "failed"):
            folder = self.path(sub) if sub else self.root
            if os.path.isdir(folder):
                for name in os.listdir(folder):
                    if name.startswith(prefix):
                        try:
                            os.remove(os.path.join(folder, name))
                            removed += 1
                        except FileNotFoundError:
                            pass
        return removed

"""The run store: Parquet logits and JSON markers under one URI (a local folder, file://, or s3://).

Layout and guarantees are the contract in docs/store.md (format_version 1):
- a model exists only when models/<model_id>.json (its marker) exists, and the marker is written last;
- no reader ever sees a partial file: local writes go to a temporary name in the same folder and are
  renamed; S3 writes are one PUT (or one completed multipart upload), which S3 makes visible atomically;
- the marker carries the sha256, size and row count of the logits file (and of the weights file), and the
  manifest the sha256 of examples.parquet, so corruption is detected;
- every key is derived from a validated model id under the store's own root: the paths written in a marker
  are informative and never followed; a damaged or foreign entry is named and treated as missing;
- one run writes a store at a time, under a lease (a lock file locally, a conditional PUT on S3).
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .confidence import logit_scaled_confidence

FORMAT_VERSION = 1
TMP_TAG = ".tmp-"
LEASE = ".lease"
ROLES = ("original", "retrain", "shadow", "unlearned")
# The one model id pattern (farm.plan makes these ids; the method label is farm.methods.method_label's output,
# which has no '-' and starts with a letter, a digit or '_'; the hash is spec.UnlearnSpec.hparams_hash).
MODEL_ID = re.compile(r"(?:original|retrain|shadow)-[0-9]{5,9}"
                      r"|unlearned-[A-Za-z0-9_][A-Za-z0-9_.]{0,127}-[0-9a-f]{8}-[0-9]{5,9}", re.ASCII)
_SHA256 = re.compile(r"[0-9a-f]{64}", re.ASCII)
_TOKEN = re.compile(r"[0-9a-f]{16}", re.ASCII)
log = logging.getLogger("ufarm")
READ_THREADS = min(16, 2 * (os.cpu_count() or 1))  # Arrow and hashlib release the GIL


class StoreError(RuntimeError):
    """A store that cannot be used as asked; the message is one line and names the store or model."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _s3_filesystem(region: str | None = None) -> tuple[pafs.S3FileSystem, str]:
    """An S3 filesystem from the standard AWS environment, with bounded retries and timeouts so an
    unreachable endpoint fails in seconds instead of retrying for minutes."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs = dict(
        region=region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        connect_timeout=float(os.environ.get("UFARM_S3_CONNECT_TIMEOUT", 3)),
        request_timeout=float(os.environ.get("UFARM_S3_REQUEST_TIMEOUT", 60)),
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=int(os.environ.get("UFARM_S3_ATTEMPTS", 4))),
    )
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
    return pafs.S3FileSystem(**kwargs), endpoint or "AWS S3"


TRANSIENT = ("SLOW_DOWN", "SlowDown", "Throttl", "503", "RequestTimeout", "InternalError", "ServiceUnavailable")


def _retry_transient(fn, what: str):
    """Call fn, retrying S3 throttling and transient server errors with exponential back-off (on top of
    the SDK's own few attempts, which a sustained SlowDown outlasts). Other errors pass through at once."""
    attempts = int(os.environ.get("UFARM_S3_RETRIES", 8))
    for attempt in range(attempts):
        try:
            return fn()
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) or not any(t in str(exc) for t in TRANSIENT) \
                    or attempt == attempts - 1:
                raise
            delay = min(8.0, 0.25 * 2 ** attempt)  # deterministic: no jitter, runs stay reproducible
            logging.getLogger("ufarm").warning("%s: %s; retrying in %.2f s", what, _first_line(exc), delay)
            time.sleep(delay)


@dataclass
class StoreConf:
    """What the reader returns for a set of models: conf[models, examples, queries] and its metadata."""
    model_ids: list[str]
    roles: np.ndarray  # str [M]
    conf: np.ndarray  # float32 [M, E, Q]
    trained_on: np.ndarray  # bool [M, E]
    forgotten: np.ndarray  # bool [M, E]
    example_ids: np.ndarray  # int32 [E]
    markers: list[dict] = field(repr=False)


def is_model_id(value) -> bool:
    """True for a string that matches the one model id pattern (MODEL_ID)."""
    return isinstance(value, str) and MODEL_ID.fullmatch(value) is not None


def check_model_id(model_id) -> str:
    if not is_model_id(model_id):
        raise StoreError(f"{_short(model_id)} is not a model id (original-00000, retrain-00017, shadow-00123 or "
                         "unlearned-<method>-<8 hex>-00005)")
    return model_id


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _safe_name(name: str) -> str:
    """A listed file name as it can be printed on one line."""
    return name if name.isprintable() else ascii(name)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_sha256(value) -> bool:
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def marker_problem(model_id: str, marker) -> str | None:
    """What is wrong with a marker read from models/<model_id>.json, or None when it is usable. The paths
    it records must be the derived ones (they are never followed); role, sha256 and bytes are required."""
    if not isinstance(marker, dict):
        return f"is not a JSON object but {type(marker).__name__}"
    if marker.get("model_id") != model_id:
        return f"has model_id {_short(marker.get('model_id'))}, which disagrees with its file name"
    if marker.get("role") != model_id.split("-", 1)[0]:
        return f"has role {_short(marker.get('role'))}, which disagrees with its model id"
    if not _is_sha256(marker.get("sha256")):
        return "has no valid sha256"
    for key in ("bytes", "rows"):
        if (key == "bytes" or key in marker) and not _is_count(marker.get(key)):
            return f"has no valid {key}"
    logits = f"logits/{model_id}.parquet"
    if marker.get("logits", logits) != logits:
        return f"records logits path {_short(marker.get('logits'))}, not {logits}"
    weights = marker.get("weights")
    if weights is not None:
        if weights != f"weights/{model_id}.pt":
            return f"records weights path {_short(weights)}, not weights/{model_id}.pt"
        if marker.get("weights_sha256") is not None and not (
                _is_sha256(marker["weights_sha256"]) and _is_count(marker.get("weights_bytes"))):
            return "has no valid weights_sha256 and weights_bytes"
    return None


def _check_s3_uri(uri: str) -> None:
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


def _lease_seconds() -> float:
    return float(os.environ.get("UFARM_LEASE_SECONDS", 120))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _holder_text(holder: dict | None) -> str:
    if not isinstance(holder, dict):
        return "unknown holder: the lease file is unreadable"
    return (f"host {_short(holder.get('host'), 40)}, pid {_short(holder.get('pid'), 12)}, "
            f"since {_short(holder.get('started_at'), 40)}")


def _client_error_code(exc) -> tuple[str, int]:
    resp = getattr(exc, "response", None) or {}
    return str(resp.get("Error", {}).get("Code", "")), int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _precondition_failed(exc) -> bool:
    code, status = _client_error_code(exc)
    return status == 412 or code == "PreconditionFailed"


def _boto_retry(fn, what: str):
    """Like _retry_transient, for the boto3 calls of the S3 lease (throttling, 5xx, conflicting conditional
    writes are retried with the same back-off; other errors pass through at once)."""
    from botocore.exceptions import ClientError

    attempts = int(os.environ.get("UFARM_S3_RETRIES", 8))
    for attempt in range(attempts):
        try:
            return fn()
        except ClientError as exc:
            code, status = _client_error_code(exc)
            transient = status in (409, 500, 502, 503, 504) or any(t in code for t in TRANSIENT) \
                or code == "ConditionalRequestConflict"
            if not transient or attempt == attempts - 1:
                raise
            delay = min(8.0, 0.25 * 2 ** attempt)
            log.warning("%s: %s; retrying in %.2f s", what, code or status, delay)
            time.sleep(delay)


class StoreLease:
    """One writer at a time (docs/store.md, "The lease"). Locally <run>/.lease, created with
    O_CREAT|O_EXCL and holding host, pid, token and start time; a lease whose pid is dead on this host is
    taken over (with a warning, removing that run's temporaries). On S3 the object <prefix>/.lease, written
    with a conditional PUT (If-None-Match: *), renewed by a background thread every ttl/4 seconds; a lease
    not renewed for ttl_seconds (by the S3 server's clock) has expired and is taken over with If-Match."""

    def __init__(self, store: "RunStore"):
        self.store = store
        self.started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.ttl = _lease_seconds()
        self.lost = False
        self._etag = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def body(self) -> bytes:
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.store.token,
                  "started_at": self.started_at}
        if self.store.is_s3:
            now = datetime.now(timezone.utc)
            holder.update(ttl_seconds=self.ttl, renewed_at=now.isoformat(timespec="seconds"),
                          expires_at=(now + timedelta(seconds=self.ttl)).isoformat(timespec="seconds"))
        return json.dumps(holder, sort_keys=True).encode()

    def _refuse(self, holder, where: str, hint: str = "") -> StoreError:
        return StoreError(f"store {self.store.uri} is leased by another run ({_holder_text(holder)}; {where}); "
                          f"one run writes a store at a time{hint}")

    # ------------------------------------------------------------------------------------- local
    def _read_local(self, path: str):
        """(holder dict or None when unreadable, True) or (None, False) when the file is gone."""
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            return None, False
        try:
            holder = json.loads(raw)
        except ValueError:
            return None, True
        return (holder if isinstance(holder, dict) else None), True

    def _acquire_local(self) -> None:
        st = self.store
        os.makedirs(st.root, exist_ok=True)
        path = os.path.join(st.root, LEASE)
        holder = None
        for _ in range(50):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(self.body())
                return
            holder, present = self._read_local(path)
            if not present:
                continue  # released meanwhile
            if holder is None:  # being written right now, or left empty by a crash right after its creation
                try:
                    age = time.time() - os.path.getmtime(path)
                except FileNotFoundError:
                    continue
                if age < 10:
                    time.sleep(0.1)
                    continue
                reason = "its lease file is unreadable and 10 s old"
            else:
                pid = holder.get("pid")
                if holder.get("host") != socket.gethostname():
                    raise self._refuse(holder, path, f"; if that run is dead, delete {path}")
                if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
                    reason = "its lease file names no process"
                elif _pid_alive(pid):
                    raise self._refuse(holder, path)
                else:
                    reason = f"its process {pid} is no longer running"
            if self._take_over_local(path, holder):
                token = holder.get("token") if holder else None
                removed = st.remove_temporaries(token) if isinstance(token, str) and _TOKEN.fullmatch(token) else 0
                log.warning("store %s: took over the lease of a dead run (%s: %s); removed %d of its temporary "
                            "files", st.uri, _holder_text(holder), reason, removed)
        raise self._refuse(holder, path)

    def _take_over_local(self, path: str, holder) -> bool:
        """Remove the lease judged stale, if it is still that lease. Takers serialize on an exclusive flock
        of the store's folder and re-read the lease under it, so of two runs that judged one dead lease
        stale only the first removes it; the second finds the first's live lease and refuses. (A lease is
        only ever removed by its holder or under this lock, so the re-read cannot go stale meanwhile.)"""
        fd = os.open(self.store.root, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            current, present = self._read_local(path)
            if not present or current != holder:
                return False
            os.unlink(path)
            return True
        finally:
            os.close(fd)  # releases the flock

    def _release_local(self) -> None:
        path = os.path.join(self.store.root, LEASE)
        holder, present = self._read_local(path)
        if present and isinstance(holder, dict) and holder.get("token") == self.store.token \
                and holder.get("pid") == os.getpid():
            os.unlink(path)

    # ---------------------------------------------------------------------------------------- S3
    def _s3(self):
        import boto3
        from botocore.config import Config

        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "://" not in endpoint:
            endpoint = f"https://{endpoint}"
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        config = Config(connect_timeout=float(os.environ.get("UFARM_S3_CONNECT_TIMEOUT", 3)),
                        read_timeout=float(os.environ.get("UFARM_S3_REQUEST_TIMEOUT", 60)),
                        retries={"max_attempts": int(os.environ.get("UFARM_S3_ATTEMPTS", 4)), "mode": "standard"})
        prefix = self.store.root[len(self.store.bucket) + 1:]
        self.key = f"{prefix}/{LEASE}" if prefix else LEASE
        self.client = boto3.client("s3", endpoint_url=endpoint or None, region_name=region, config=config)

    def _put(self, **condition) -> None:
        resp = _boto_retry(lambda: self.client.put_object(Bucket=self.store.bucket, Key=self.key, Body=self.body(),
                                                          **condition), f"writing the lease {self.key}")
        self._etag = resp["ETag"]

    def _acquire_s3(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

        st = self.store
        self._s3()
        where = f"s3://{st.bucket}/{self.key}"
        holder = None
        try:
            for _ in range(10):
                try:
                    self._put(IfNoneMatch="*")
                    return self._start_renewing()
                except ClientError as exc:
                    if not _precondition_failed(exc):
                        raise
                try:
                    got = _boto_retry(lambda: self.client.get_object(Bucket=st.bucket, Key=self.key),
                                      f"reading the lease {self.key}")
                except ClientError as exc:
                    if _client_error_code(exc)[0] in ("NoSuchKey", "404") or _client_error_code(exc)[1] == 404:
                        continue  # released meanwhile
                    raise
                raw = got["Body"].read()
                try:
                    holder = json.loads(raw)
                except ValueError:
                    holder = None
                holder = holder if isinstance(holder, dict) else None
                ttl = holder.get("ttl_seconds") if holder else None
                ttl = float(ttl) if isinstance(ttl, (int, float)) and not isinstance(ttl, bool) else _lease_seconds()
                # the server's clock on both sides: the age of the last renewal, free of client clock skew
                date = got.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
                server_now = parsedate_to_datetime(date) if date else datetime.now(timezone.utc)
                age = (server_now - got["LastModified"]).total_seconds()
                if age <= ttl:
                    raise self._refuse(holder, where, f"; it expires {ttl - age:.0f} s after its last renewal "
                                                      "if that run is dead")
                try:
                    self._put(IfMatch=got["ETag"])  # only if nobody renewed or took it meanwhile
                except ClientError as exc:
                    if _precondition_failed(exc) or _client_error_code(exc)[1] == 404:
                        continue
                    raise
                log.warning("store %s: took over an expired lease (%s: not renewed for %.0f s)", st.uri,
                            _holder_text(holder), age)
                return self._start_renewing()
        except ClientError as exc:
            code, status = _client_error_code(exc)
            raise StoreError(f"store {st.uri}: cannot take its lease {where}: {code or status} "
                             f"({_first_line(exc)})") from None
        except ParamValidationError as exc:  # a boto3 older than conditional writes (1.35)
            raise StoreError(f"store {st.uri}: this boto3 cannot write the lease with a conditional PUT "
                             f"({_first_line(exc)}); install boto3 >= 1.35") from None
        except BotoCoreError as exc:
            raise StoreError(f"cannot reach the S3 store {st.uri} at {st.endpoint}: {_first_line(exc)}") from None
        raise self._refuse(holder, where)

    def _start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew, name="ufarm-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        from botocore.exceptions import ClientError

        interval = max(0.05, self.ttl / 4)
        while not self._stop.wait(interval):
            try:
                self._put(IfMatch=self._etag)
            except ClientError as exc:
                if _precondition_failed(exc) or _client_error_code(exc)[1] == 404:
                    self.lost = True
                    log.warning("store %s: lost its lease s3://%s/%s (it expired and another run took it over)",
                                self.store.uri, self.store.bucket, self.key)
                    return
                log.warning("store %s: could not renew its lease (%s); retrying in %.0f s", self.store.uri,
                            _first_line(exc), interval)
            except Exception as exc:  # network trouble: try again at the next tick, before the lease expires
                log.warning("store %s: could not renew its lease (%s); retrying in %.0f s", self.store.uri,
                            _first_line(exc), interval)

    def _release_s3(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.lost:
            return
        st = self.store
        try:
            got = self.client.get_object(Bucket=st.bucket, Key=self.key)
            holder = json.loads(got["Body"].read())
            if isinstance(holder, dict) and holder.get("token") == st.token:
                _boto_retry(lambda: self.client.delete_object(Bucket=st.bucket, Key=self.key),
                            f"deleting the lease {self.key}")
        except Exception as exc:  # never mask the run's own outcome; the lease expires by itself
            log.warning("store %s: could not release its lease (%s); it expires in %.0f s", st.uri,
                        _first_line(exc), self.ttl)

    # -------------------------------------------------------------------------------------- both
    def acquire(self) -> "StoreLease":
        (self._acquire_s3 if self.store.is_s3 else self._acquire_local)()
        return self

    def release(self) -> None:
        if self.store.is_s3:
            self._release_s3()
        else:
            self._release_local()
            self.store.remove_temporaries()


class RunStore:
    def __init__(self, uri: str):
        self.uri = uri.rstrip("/") if uri != "/" else uri
        parsed = urlparse(uri)
        self.is_s3 = parsed.scheme == "s3"
        # a per-instance token: names this writer's temporaries and its lease
        self.token = uuid.uuid4().hex[:16]
        self._tmp_token: str | None = None
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        self._lease_depth = 0
        if self.is_s3:
            if not parsed.netloc:
                raise StoreError(f"store URI {uri!r} names no bucket; use s3://bucket/prefix")
            _check_s3_uri(uri)
            self.fs, self.endpoint = _s3_filesystem()
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
                raise StoreError(f"cannot reach the S3 store {self.uri} at {self.endpoint}: {_first_line(exc)}") from None
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
            self._tmp_token = token if isinstance(token, str) and _TOKEN.fullmatch(token) else self.token
        return self._tmp_token

    def write_bytes(self, rel: str, data: bytes | pa.Buffer) -> None:
        """Atomic from a reader's point of view (see the module docstring). data: any bytes-like object."""
        target = self.path(rel)
        if self.is_s3:
            def put():
                with self.fs.open_output_stream(target) as out:
                    out.write(data)
            return _retry_transient(put, f"writing {self.uri}/{rel}")
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
            return _retry_transient(get, f"reading {self.uri}/{rel}") if self.is_s3 else get()
        except FileNotFoundError:
            raise StoreError(f"{self.uri}/{rel} does not exist") from None

    def write_json(self, rel: str, obj: dict) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=_json_default).encode())

    def read_json(self, rel: str) -> dict:
        return json.loads(self.read_bytes(rel))

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self.path(rel))
        except FileNotFoundError:
            pass

    def list_dir(self, rel: str) -> list[pafs.FileInfo]:
        """Files directly under a folder of the store, without temporaries; [] when the folder is absent."""
        return [i for i in self._entries(rel) if i.type == pafs.FileType.File]

    def _entries(self, rel: str) -> list[pafs.FileInfo]:
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

    @contextmanager
    def lease(self):
        """Hold the store's lease for the body of a with-block (re-entrant on one RunStore); a StoreError
        naming the holder when another live run holds it. Released on every exit, removing this writer's
        temporaries."""
        if self._lease_depth:
            self._lease_depth += 1
            try:
                yield self
            finally:
                self._lease_depth -= 1
            return
        held = StoreLease(self).acquire()
        self._lease_depth = 1
        try:
            yield held
        finally:
            self._lease_depth = 0
            held.release()

    def _warn_damaged(self, entries: list[tuple[str, str]]) -> None:
        """Name damaged or foreign entries in one warning line (each once per RunStore)."""
        with self._lock:
            new = sorted({k: why for k, why in entries if k not in self._warned}.items())
            self._warned.update(k for k, _ in new)
        if not new:
            return
        shown = "; ".join(f"{_safe_name(k)} {why}" for k, why in new[:10])
        more = f"; and {len(new) - 10} more" if len(new) > 10 else ""
        log.warning("store %s: %d damaged or foreign entr%s, treated as missing: %s%s", self.uri, len(new),
                    "y" if len(new) == 1 else "ies", shown, more)

    # ------------------------------------------------------------------------------- run identity
    def read_manifest(self) -> dict | None:
        """The manifest, or None when the store has none; a StoreError for one this ufarm cannot read
        (not JSON, lacking spec / n_examples / n_classes, or a format_version other than 1; an absent
        format_version is that of the first stores, 1)."""
        if not self.exists("manifest.json"):
            return None
        try:
            manifest = json.loads(self.read_bytes("manifest.json"))
        except (ValueError, RecursionError) as exc:
            raise StoreError(f"store {self.uri}: manifest.json is not valid JSON ({_first_line(exc)})") from None
        if not isinstance(manifest, dict):
            raise StoreError(f"store {self.uri}: manifest.json is not a JSON object")
        version = manifest.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise StoreError(f"store {self.uri}: manifest.json has format_version {_short(version)}; this ufarm "
                             f"reads format_version {FORMAT_VERSION}")
        if not isinstance(manifest.get("spec"), dict) or not _is_count(manifest.get("n_examples")) \
                or not _is_count(manifest.get("n_classes")):
            raise StoreError(f"store {self.uri}: manifest.json lacks a valid spec, n_examples or n_classes")
        return manifest

    def read_examples(self, manifest: dict | None = None) -> pa.Table:
        """examples.parquet, checked against the manifest's examples_sha256 (manifests written before it
        have none and are read unchecked)."""
        want = (manifest if manifest is not None else self.read_manifest() or {}).get("examples_sha256")
        try:
            data = self.read_bytes("examples.parquet")
        except StoreError:
            raise StoreError(f"store {self.uri}: examples.parquet does not exist; `ufarm run` rewrites it") from None
        if want is not None:
            digest = hashlib.sha256(data).hexdigest()
            if digest != want:
                raise StoreError(f"store {self.uri}: examples.parquet fails its checksum (manifest "
                                 f"{_short(want, 15)}, file {digest[:12]}); `ufarm run` rewrites it")
        try:
            return pq.read_table(pa.BufferReader(data))
        except pa.ArrowException as exc:
            raise StoreError(f"store {self.uri}: examples.parquet is not readable Parquet ({_first_line(exc)}); "
                             "`ufarm run` rewrites it") from None

    def _examples_problem(self, manifest: dict, expected: pa.Table) -> str | None:
        if not self.exists("examples.parquet"):
            return "was missing"
        try:
            table = self.read_examples(manifest)
        except StoreError as exc:
            return "fails its checksum" if "checksum" in str(exc) else "was not readable Parquet"
        if not table.equals(expected):
            return "differed from the spec's examples"
        return None

    def init_run(self, manifest: dict, examples: pa.Table) -> None:
        """Create the run, or check that the store already holds this run and record the latest spec.

        A store made from another dataset or another spec identity is refused before anything is written.
        A missing or damaged examples.parquet of an existing run is rewritten from the spec (it is a
        deterministic function of it) and said so in one warning line.
        """
        buf = io.BytesIO()
        pq.write_table(examples, buf)
        data = buf.getvalue()
        old = self.read_manifest()
        if old is not None:
            check_compatible(old, manifest, self.uri)
            new = {**old, "spec": manifest["spec"]}
            problem = self._examples_problem(old, examples)
            if problem:
                self.write_bytes("examples.parquet", data)
                new["examples_sha256"] = hashlib.sha256(data).hexdigest()
                log.warning("store %s: examples.parquet %s; rewrote it from the spec", self.uri, problem)
            elif "examples_sha256" not in old:  # a manifest from before the checksum: record the file's
                new["examples_sha256"] = hashlib.sha256(self.read_bytes("examples.parquet")).hexdigest()
            if new != old:
                self.write_json("manifest.json", new)
            return
        if self.list_dir("models"):
            raise StoreError(f"store {self.uri} has models but no manifest.json; it was not made by ufarm")
        self.write_bytes("examples.parquet", data)
        # last: a store without a manifest is not a run yet
        self.write_json("manifest.json", {**manifest, "examples_sha256": hashlib.sha256(data).hexdigest()})

    # --------------------------------------------------------------------------------- models
    def markers(self, _damaged: list | None = None) -> dict[str, dict]:
        """model_id -> marker for every committed model (read in parallel: on S3 each is a GET). Entries
        of models/ that are not usable markers are named in one warning line and left out."""
        damaged: list[tuple[str, str]] = [] if _damaged is None else _damaged
        candidates = []
        for info in self._entries("models"):
            name = info.base_name
            if info.type != pafs.FileType.File:
                damaged.append((f"models/{name}", "is a folder"))
            elif not (name.endswith(".json") and is_model_id(name[: -len(".json")])):
                damaged.append((f"models/{name}", "is not named <model id>.json"))
            else:
                candidates.append(name[: -len(".json")])

        def load(mid):
            try:
                data = self.read_bytes(f"models/{mid}.json")
            except StoreError:
                return mid, None, None  # removed since the listing
            try:
                marker = json.loads(data)
            except (ValueError, RecursionError) as exc:
                return mid, None, f"is not valid JSON ({_first_line(exc)})"
            return mid, marker, marker_problem(mid, marker)

        with ThreadPoolExecutor(max_workers=16) as pool:
            loaded = list(pool.map(load, candidates))
        good = {}
        for mid, marker, problem in loaded:
            if problem:
                damaged.append((f"models/{mid}.json", problem))
            elif marker is not None:
                good[mid] = marker
        if _damaged is None:
            self._warn_damaged(damaged)
        return good

    def marker(self, model_id: str) -> dict:
        """One model's marker, checked as markers() checks it; a StoreError naming the model otherwise."""
        rel = f"models/{check_model_id(model_id)}.json"
        try:
            data = self.read_bytes(rel)
        except StoreError:
            raise StoreError(f"store {self.uri} has no model {model_id} (no {rel})") from None
        try:
            marker = json.loads(data)
        except (ValueError, RecursionError):
            raise StoreError(f"model {model_id}: {rel} is not valid JSON; `ufarm run` retrains it") from None
        problem = marker_problem(model_id, marker)
        if problem:
            raise StoreError(f"model {model_id}: {rel} {problem}; `ufarm run` retrains it")
        return marker

    def logits_sizes(self, _damaged: list | None = None) -> dict[str, int]:
        """model_id -> size of its logits file; other entries of logits/ are named in one warning line."""
        sizes, damaged = {}, ([] if _damaged is None else _damaged)
        for info in self._entries("logits"):
            name = info.base_name
            if info.type == pafs.FileType.File and name.endswith(".parquet") \
                    and is_model_id(name[: -len(".parquet")]):
                sizes[name[: -len(".parquet")]] = info.size
            else:
                damaged.append((f"logits/{name}", "is a folder" if info.type != pafs.FileType.File
                                else "is not named <model id>.parquet"))
        if _damaged is None:
            self._warn_damaged(damaged)
        return sizes

    def intact_models(self, _damaged: list | None = None) -> dict[str, dict]:
        """Markers whose logits file exists with the recorded size: a cheap check (one listing) that
        catches deleted or truncated files; the sha256 is checked when a file is read. Damaged or foreign
        entries of models/ and logits/ are named in one warning line."""
        damaged = [] if _damaged is None else _damaged
        sizes = self.logits_sizes(damaged)
        intact = {mid: m for mid, m in self.markers(damaged).items() if sizes.get(mid) == m.get("bytes")}
        if _damaged is None:
            self._warn_damaged(damaged)
        return intact

    def _verify_problem(self, model_id: str, marker: dict) -> tuple[str, str] | None:
        rel = f"logits/{model_id}.parquet"
        try:
            data = self.read_bytes(rel)
        except StoreError:
            return rel, "is missing"
        if hashlib.sha256(data).hexdigest() != marker["sha256"]:
            return rel, "fails its checksum"
        if marker.get("weights") is None:
            return None
        rel = f"weights/{model_id}.pt"
        if marker.get("weights_sha256") is None:  # a marker from before weights checksums: existence only
            return None if self.exists(rel) else (rel, "is missing")
        try:
            data = self.read_bytes(rel)
        except StoreError:
            return rel, "is missing"
        if len(data) != marker["weights_bytes"] or hashlib.sha256(data).hexdigest() != marker["weights_sha256"]:
            return rel, "fails its checksum"
        return None

    def verified_models(self) -> dict[str, dict]:
        """Markers whose logits file, and weights file where the marker records one, match the recorded
        sha256 (reads every file; `ufarm run --verify`). The others are named in one warning line."""
        damaged: list[tuple[str, str]] = []
        intact = self.intact_models(damaged)
        with ThreadPoolExecutor(max_workers=8) as pool:
            problems = list(pool.map(lambda item: self._verify_problem(*item), intact.items()))
        self._warn_damaged(damaged + [p for p in problems if p is not None])
        return {mid: m for (mid, m), p in zip(intact.items(), problems) if p is None}

    def write_model(self, model_id: str, table: pa.Table, marker: dict, weights: bytes | None = None) -> dict:
        """Weights, then the logits file, then the marker (the commit). Returns the marker written."""
        check_model_id(model_id)
        if weights is not None:
            self.write_bytes(f"weights/{model_id}.pt", weights)
        data = parquet_bytes(table)
        self.write_bytes(f"logits/{model_id}.parquet", data)
        marker = {**marker, "model_id": model_id, "logits": f"logits/{model_id}.parquet",
                  "sha256": hashlib.sha256(data).hexdigest(), "bytes": data.size, "rows": table.num_rows,
                  "weights": f"weights/{model_id}.pt" if weights is not None else None,
                  "weights_sha256": hashlib.sha256(weights).hexdigest() if weights is not None else None,
                  "weights_bytes": memoryview(weights).nbytes if weights is not None else None,
                  "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.write_json(f"models/{model_id}.json", marker)
        self.delete(f"failed/{model_id}.json")
        return marker

    def read_weights(self, model_id: str, marker: dict | None = None) -> bytes:
        """weights/<model_id>.pt; with the model's marker, checked against its weights_sha256 (a StoreError
        naming the model on a mismatch; markers from before weights checksums have none to check)."""
        rel = f"weights/{check_model_id(model_id)}.pt"
        if marker is not None:
            problem = marker_problem(model_id, marker)
            if problem:
                raise StoreError(f"model {model_id}: its marker {problem}")
            if marker.get("weights") is None:
                raise StoreError(f"model {model_id} has no stored weights (its marker records none)")
        data = self.read_bytes(rel)
        want = marker.get("weights_sha256") if marker is not None else None
        if want is not None:
            digest = hashlib.sha256(data).hexdigest()
            if digest != want or len(data) != marker.get("weights_bytes"):
                raise StoreError(f"model {model_id}: weights file {rel} fails its checksum (marker {want[:12]}, "
                                 f"file {digest[:12]}); `ufarm run --verify` retrains it")
        return data

    def read_logits(self, model_id: str, marker: dict, columns: list[str] | None = None,
                    verify: bool = True) -> pa.Table:
        """logits/<model_id>.parquet (the key derived from the id, never a path from the marker), checked
        against the marker's sha256."""
        rel = f"logits/{check_model_id(model_id)}.parquet"
        problem = marker_problem(model_id, marker)
        if problem:
            raise StoreError(f"model {model_id}: its marker {problem}")
        data = self.read_bytes(rel)
        if verify:
            digest = hashlib.sha256(data).hexdigest()
            if digest != marker["sha256"]:
                raise StoreError(f"model {model_id}: logits file {rel} fails its checksum "
                                 f"(marker {marker['sha256'][:12]}, file {digest[:12]}); `ufarm run` retrains it")
        # one thread per file: callers read many files from a thread pool, which parallelises better
        try:
            return pq.ParquetFile(pa.BufferReader(data)).read(columns=columns, use_threads=False)
        except pa.ArrowException as exc:
            raise StoreError(f"model {model_id}: logits file {rel} is not readable ({_first_line(exc)})") from None

    def read_conf(self, model_ids: list[str] | None = None, roles: tuple[str, ...] | None = None,
                  verify: bool = True) -> StoreConf:
        """conf[models, examples, queries] (float32) with roles and per-example membership, for the given
        models (default: every committed model, optionally only some roles), in model-id order."""
        markers = self.markers()
        if model_ids is None:
            model_ids = sorted(m for m, mk in markers.items() if roles is None or mk["role"] in roles)
        missing = [m for m in model_ids if m not in markers]
        if missing:
            raise StoreError(f"store {self.uri} has no model(s) {', '.join(missing[:5])}"
                             f"{' ...' if len(missing) > 5 else ''}")
        manifest = self.read_manifest()
        n_q = len(manifest["spec"]["queries"])
        n_e = manifest["n_examples"]
        m = len(model_ids)
        # filled in place by the readers: no per-model copies to stack at the end
        conf = np.empty((m, n_e, n_q), np.float32)
        trained_on = np.empty((m, n_e), bool)
        forgotten = np.empty((m, n_e), bool)

        def load(i_mid):
            i, mid = i_mid
            t = self.read_logits(mid, markers[mid], columns=["conf", "trained_on", "forgotten"], verify=verify)
            if t.num_rows != n_e * n_q:
                raise StoreError(f"model {mid}: logits file has {t.num_rows} rows, the run has {n_e} x {n_q}")
            conf[i] = t.column("conf").to_numpy().reshape(n_e, n_q)
            trained_on[i] = t.column("trained_on").to_numpy()[::n_q]
            forgotten[i] = t.column("forgotten").to_numpy()[::n_q]

        with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
            list(pool.map(load, enumerate(model_ids)))
        return StoreConf(
            model_ids=list(model_ids),
            roles=np.array([markers[i]["role"] for i in model_ids], dtype=object),
            conf=conf, trained_on=trained_on, forgotten=forgotten,
            example_ids=np.arange(n_e, dtype=np.int32),
            markers=[markers[i] for i in model_ids],
        )

    # ------------------------------------------------------------------------------- failures
    def write_failure(self, model_id: str, info: dict) -> None:
        self.write_json(f"failed/{model_id}.json", {**info, "model_id": model_id})

    def failures(self) -> dict[str, dict]:
        """model_id -> failure record; unusable entries of failed/ are named in one warning line and left out."""
        out, damaged = {}, []
        for info in self._entries("failed"):
            name = info.base_name
            mid = name[: -len(".json")] if name.endswith(".json") else None
            if info.type != pafs.FileType.File or not is_model_id(mid):
                damaged.append((f"failed/{name}", "is not named <model id>.json"))
                continue
            try:
                record = json.loads(self.read_bytes(f"failed/{name}"))
            except StoreError:
                continue  # removed since the listing (the model succeeded)
            except (ValueError, RecursionError) as exc:
                damaged.append((f"failed/{name}", f"is not valid JSON ({_first_line(exc)})"))
                continue
            if not isinstance(record, dict):
                damaged.append((f"failed/{name}", "is not a JSON object"))
                continue
            error = record.get("error")
            out[mid] = {**record, "model_id": mid, "error": error if isinstance(error, str) else "unknown error"}
        self._warn_damaged(damaged)
        return out


def check_compatible(old: dict, new: dict, uri: str) -> None:
    version = old.get("format_version", FORMAT_VERSION)  # absent: the first stores, format 1
    if version != FORMAT_VERSION:
        raise StoreError(f"store {uri}: manifest.json has format_version {_short(version)}; this ufarm reads "
                         f"format_version {FORMAT_VERSION}")
    dataset = old.get("dataset")
    if not isinstance(old.get("identity"), str) or not isinstance(old.get("identity_fields"), dict) \
            or not isinstance(dataset, dict) or not isinstance(dataset.get("fingerprint"), str):
        raise StoreError(f"store {uri}: manifest.json lacks a valid identity, identity_fields or dataset "
                         "fingerprint; it was not made by ufarm, use another store")
    if old["identity"] != new["identity"]:
        changed = sorted(k for k in new["identity_fields"] if old["identity_fields"].get(k) != new["identity_fields"][k])
        raise StoreError(f"store {uri} holds another spec ({old['spec'].get('name')!r}); fields that differ: "
                         f"{', '.join(changed) or 'unknown'}; use another store")
    if old["dataset"]["fingerprint"] != new["dataset"]["fingerprint"]:
        raise StoreError(f"store {uri} holds a run on other data ({old['dataset']['name']}, fingerprint "
                         f"{old['dataset']['fingerprint'][:12]}), not {new['dataset']['name']} "
                         f"{new['dataset']['fingerprint'][:12]}; use another store")

def logits_table(labels: np.ndarray, logits: np.ndarray, trained_on: np.ndarray, forgotten: np.ndarray,
                 keep_logits: bool) -> pa.Table:
    """One row per (example, query), example-major: row e * Q + q. logits is float32 [E, Q, C].

    Every field is declared non-nullable (no column ever holds a null): Parquet then stores no definition
    levels, which makes both encoding and decoding cheaper (docs/benchmarks.md, the store benchmark); the
    types are the contract's either way."""
    n_e, n_q, n_c = logits.shape
    conf = logit_scaled_confidence(logits, labels[:, None]).astype(np.float32)
    columns = {
        "example_id": pa.array(np.repeat(np.arange(n_e, dtype=np.int32), n_q)),
        "query": pa.array(np.tile(np.arange(n_q, dtype=np.int8), n_e)),
        "conf": pa.array(conf.reshape(-1)),
        "pred": pa.array(logits.argmax(-1).astype(np.int16).reshape(-1)),
        "trained_on": pa.array(np.repeat(trained_on, n_q)),
        "forgotten": pa.array(np.repeat(forgotten, n_q)),
    }
    if keep_logits:
        flat = pa.array(np.ascontiguousarray(logits, dtype=np.float32).reshape(-1))
        columns["logits"] = pa.FixedSizeListArray.from_arrays(flat, n_c)
    schema = pa.schema([pa.field(name, array.type, nullable=False) for name, array in columns.items()])
    return pa.Table.from_arrays(list(columns.values()), schema=schema)


def parquet_bytes(table: pa.Table) -> pa.Buffer:
    """A logits table as Parquet bytes, with encodings chosen by measurement (docs/store.md): example ids,
    sorted, delta-packed; the alternating query column Snappy-compressed; everything else plain, with no
    dictionaries and no compression (random floats do not compress; a dictionary for pred saves 0.5 MB a
    file at 70,000 x 2 rows but costs more time in encoding than it saves in hashing and writing)."""
    present = set(table.column_names)
    encoding = {c: "PLAIN" for c in ("query", "conf", "pred", "trained_on", "forgotten") if c in present}
    encoding["example_id"] = "DELTA_BINARY_PACKED"
    compression = {c: "none" for c in present}
    compression["query"] = "snappy"
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=compression, use_dictionary=False, column_encoding=encoding,
                   write_statistics=False)
    return sink.getvalue()


def examples_table(split: np.ndarray, labels: np.ndarray, groups: np.ndarray | None, forget: np.ndarray) -> pa.Table:
    n = len(labels)
    return pa.table({
        "example_id": pa.array(np.arange(n, dtype=np.int32)),
        "split": pa.array(split.astype(str)),
        "label": pa.array(labels.astype(np.int16)),
        "group": pa.array(groups.astype(np.int32) if groups is not None else [None] * n, type=pa.int32()),
        "forget": pa.array(forget.astype(bool)),
    })


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")

"""One writer per store at a time (docs/store.md, "The lease"): a lock file on a local store, an object
written with a conditional PUT and renewed on S3."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING

from farm.settings import Settings

from .filesystem import boto_retry, client_error_code, precondition_failed, s3_client
from .layout import LEASE, TOKEN, StoreError, first_line, short

if TYPE_CHECKING:
    from .run_store import RunStore

log = logging.getLogger("ufarm")


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def holder_text(holder: dict | None) -> str:
    if not isinstance(holder, dict):
        return "unknown holder: the lease file is unreadable"
    return (f"host {short(holder.get('host'), 40)}, pid {short(holder.get('pid'), 12)}, "
            f"since {short(holder.get('started_at'), 40)}")




class StoreLease:
    """One writer at a time (docs/store.md, "The lease"). Locally <run>/.lease, created with
    O_CREAT|O_EXCL and holding host, pid, token and start time; a lease whose pid is dead on this host is
    taken over (with a warning, removing that run's temporaries). On S3 the object <prefix>/.lease, written
    with a conditional PUT (If-None-Match: *), renewed by a background thread every ttl/4 seconds; a lease
    not renewed for ttl_seconds (by the S3 server's clock) has expired and is taken over with If-Match."""

    def __init__(self, store: "RunStore"):
        self.store = store
        self.started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.ttl = Settings.from_env().lease_seconds
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
        return StoreError(f"store {self.store.uri} is leased by another run ({holder_text(holder)}; {where}); "
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
                elif pid_alive(pid):
                    raise self._refuse(holder, path)
                else:
                    reason = f"its process {pid} is no longer running"
            if self._take_over_local(path, holder):
                token = holder.get("token") if holder else None
                removed = st.remove_temporaries(token) if isinstance(token, str) and TOKEN.fullmatch(token) else 0
                log.warning("store %s: took over the lease of a dead run (%s: %s); removed %d of its temporary "
                            "files", st.uri, holder_text(holder), reason, removed)
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
        prefix = self.store.root[len(self.store.bucket) + 1:]
        self.key = f"{prefix}/{LEASE}" if prefix else LEASE
        self.client = s3_client()

    def _put(self, **condition) -> None:
        resp = boto_retry(lambda: self.client.put_object(Bucket=self.store.bucket, Key=self.key, Body=self.body(),
                                                          **condition), f"writing the lease {self.key}")
        self._etag = resp["ETag"]

    def _acquire_s3(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError  # boto3 only for the S3 lease

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
                    if not precondition_failed(exc):
                        raise
                try:
                    got = boto_retry(lambda: self.client.get_object(Bucket=st.bucket, Key=self.key),
                                      f"reading the lease {self.key}")
                except ClientError as exc:
                    if client_error_code(exc)[0] in ("NoSuchKey", "404") or client_error_code(exc)[1] == 404:
                        continue  # released meanwhile
                    raise
                raw = got["Body"].read()
                try:
                    holder = json.loads(raw)
                except ValueError:
                    holder = None
                holder = holder if isinstance(holder, dict) else None
                ttl = holder.get("ttl_seconds") if holder else None
                ttl = float(ttl) if isinstance(ttl, (int, float)) and not isinstance(ttl, bool) else Settings.from_env().lease_seconds
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
                    if precondition_failed(exc) or client_error_code(exc)[1] == 404:
                        continue
                    raise
                log.warning("store %s: took over an expired lease (%s: not renewed for %.0f s)", st.uri,
                            holder_text(holder), age)
                return self._start_renewing()
        except ClientError as exc:
            code, status = client_error_code(exc)
            raise StoreError(f"store {st.uri}: cannot take its lease {where}: {code or status} "
                             f"({first_line(exc)})") from None
        except ParamValidationError as exc:  # a boto3 older than conditional writes (1.35)
            raise StoreError(f"store {st.uri}: this boto3 cannot write the lease with a conditional PUT "
                             f"({first_line(exc)}); install boto3 >= 1.35") from None
        except BotoCoreError as exc:
            raise StoreError(f"cannot reach the S3 store {st.uri} at {st.endpoint}: {first_line(exc)}") from None
        raise self._refuse(holder, where)

    def _start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew, name="ufarm-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        from botocore.exceptions import ClientError  # boto3 only for the S3 lease

        interval = max(0.05, self.ttl / 4)
        while not self._stop.wait(interval):
            try:
                self._put(IfMatch=self._etag)
            except ClientError as exc:
                if precondition_failed(exc) or client_error_code(exc)[1] == 404:
                    self.lost = True
                    log.warning("store %s: lost its lease s3://%s/%s (it expired and another run took it over)",
                                self.store.uri, self.store.bucket, self.key)
                    return
                log.warning("store %s: could not renew its lease (%s); retrying in %.0f s", self.store.uri,
                            first_line(exc), interval)
            except Exception as exc:  # network trouble: try again at the next tick, before the lease expires
                log.warning("store %s: could not renew its lease (%s); retrying in %.0f s", self.store.uri,
                            first_line(exc), interval)

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
                boto_retry(lambda: self.client.delete_object(Bucket=st.bucket, Key=self.key),
                            f"deleting the lease {self.key}")
        except Exception as exc:  # never mask the run's own outcome; the lease expires by itself
            log.warning("store %s: could not release its lease (%s); it expires in %.0f s", st.uri,
                        first_line(exc), self.ttl)

    # -------------------------------------------------------------------------------------- both
    def acquire(self) -> "StoreLease":
        (self._acquire_s3 if self.store.is_s3 else self._acquire_local)()
        log.debug("store %s: lease taken (token %s)", self.store.uri, self.store.token)
        return self

    def release(self) -> None:
        if self.store.is_s3:
            self._release_s3()
        else:
            self._release_local()
            self.store.remove_temporaries()


"""Every setting ufarm reads from the environment, in one table: its variable, default and whether the
driver hands it to its Ray workers.

Workers get credentials the way AWS tools do (their own environment, profile or instance role). Only the
non-secret settings marked `forwarded` travel in Ray's runtime_env, which Ray writes into its session logs;
credentials never do, and every line ufarm prints has their values redacted (`SECRET_ENV`).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

# credentials: never forwarded, never written; their values are redacted from every line ufarm prints
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


@dataclass(frozen=True)
class Setting:
    env: str
    default: float | int | str | None
    forwarded: bool  # whether Ray workers need it (they write the store); driver-only settings stay
    help: str


SETTINGS = (
    Setting("AWS_ENDPOINT_URL", None, True, "S3 endpoint URL (any S3-compatible service)"),
    Setting("AWS_ENDPOINT_URL_S3", None, True, "S3 endpoint URL, preferred over AWS_ENDPOINT_URL"),
    Setting("AWS_REGION", None, True, "S3 region"),
    Setting("AWS_DEFAULT_REGION", None, True, "S3 region when AWS_REGION is unset (default us-east-1)"),
    Setting("AWS_PROFILE", None, True, "the AWS profile whose credentials workers read from their own files"),
    Setting("UFARM_S3_CONNECT_TIMEOUT", 3.0, True, "seconds to connect to S3 before an attempt fails"),
    Setting("UFARM_S3_REQUEST_TIMEOUT", 60.0, True, "seconds one S3 request may take"),
    Setting("UFARM_S3_ATTEMPTS", 4, True, "attempts of the S3 SDKs' own retry strategy"),
    Setting("UFARM_S3_RETRIES", 8, True, "ufarm's retries of throttling and 5xx, with jittered back-off"),
    Setting("UFARM_LEASE_SECONDS", 120.0, False, "seconds an S3 lease lives without being renewed"),
    Setting("UFARM_WAIT_FOR_RESOURCES", None, False, "seconds to wait for a node that can hold one worker"),
    Setting("RAY_ADDRESS", None, False, "the Ray cluster to join (default: a local Ray)"),
)
FORWARDED_ENV = tuple(s.env for s in SETTINGS if s.forwarded)


class SettingsError(ValueError):
    """An environment setting that cannot be used; the message is one line and names the variable."""


def _number(environ: Mapping[str, str], name: str, kind: type, low: float):
    default = next(s.default for s in SETTINGS if s.env == name)
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise SettingsError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {raw!r}") from None
    if not math.isfinite(value) or value < low:
        raise SettingsError(f"{name} must be a finite number >= {low:g}, got {raw!r}")
    return value


@dataclass(frozen=True)
class Settings:
    """The environment's settings, read and checked at once (`Settings.from_env()`)."""
    s3_endpoint: str | None
    region: str
    s3_connect_timeout: float
    s3_request_timeout: float
    s3_attempts: int
    s3_retries: int
    lease_seconds: float
    wait_for_resources: float | None
    ray_address: str | None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        return cls(
            s3_endpoint=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            s3_connect_timeout=_number(env, "UFARM_S3_CONNECT_TIMEOUT", float, 0.1),
            s3_request_timeout=_number(env, "UFARM_S3_REQUEST_TIMEOUT", float, 0.1),
            s3_attempts=_number(env, "UFARM_S3_ATTEMPTS", int, 1),
            s3_retries=_number(env, "UFARM_S3_RETRIES", int, 1),
            lease_seconds=_number(env, "UFARM_LEASE_SECONDS", float, 0.5),
            wait_for_resources=_number(env, "UFARM_WAIT_FOR_RESOURCES", float, 0.0),
            ray_address=env.get("RAY_ADDRESS") or None,
        )

    @property
    def endpoint_url(self) -> str | None:
        """The endpoint with a scheme (https:// when the variable gives a bare host)."""
        if self.s3_endpoint and "://" not in self.s3_endpoint:
            return f"https://{self.s3_endpoint}"
        return self.s3_endpoint


def forwarded_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The driver's settings that its Ray workers need, so they write to the store the driver checked."""
    env = os.environ if environ is None else environ
    return {k: env[k] for k in FORWARDED_ENV if k in env}


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    """text with the values of the credential variables (8 characters or more) replaced by ***."""
    env = os.environ if environ is None else environ
    for name in SECRET_ENV:
        value = env.get(name, "")
        if len(value) >= 8:
            text = text.replace(value, "***")
    return text

"""Tandem's settings: one frozen, typed Config built once at start-up.

Values come from the environment, then from a `.env` file in the working
directory for names the environment does not set. Every value is parsed and
range-checked here; a bad one raises ConfigError naming the setting and what
is allowed, and `python server.py` prints that one line and exits 2.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import protocol

T = TypeVar("T")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# The protocol allows 6-character codes; Tandem issues no fewer than 8, since 6
# falls to a thousand guessing addresses within hours (README "Security").
MIN_CODE_LENGTH = 8


class ConfigError(ValueError):
    """A setting has a value Tandem cannot use."""

    def __init__(self, name: str, value: str, allowed: str) -> None:
        super().__init__(f"invalid setting {name}={value!r}: expected {allowed}")
        self.name = name


@dataclass(frozen=True, slots=True)
class Config:
    host: str = "0.0.0.0"
    port: int = 3001
    data_dir: Path = Path("data")
    max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES
    session_idle_timeout: float = 1800.0
    session_ttl: float = 86400.0
    history_size: int = 100
    allowed_origins: tuple[str, ...] = ()  # empty: any origin
    ping_interval: float = 20.0
    shutdown_grace: float = 10.0
    log_level: str = "INFO"
    # 8 characters of a 32-letter alphabet: 2**40 codes. 6 (allowed by the
    # protocol) falls to a botnet in hours; README "Security" has the bound.
    code_length: int = 8
    send_queue_frames: int = 256
    send_queue_bytes: int = 1024 * 1024
    max_consecutive_errors: int = 20
    sweep_interval: float = 1.0
    gc_full_interval: float = 300.0  # 0: CPython's automatic collector
    sqlite_synchronous: str = "FULL"
    redis_url: str | None = None  # set: sessions live in Redis, shared by instances
    redis_cluster: bool = False
    # PostgreSQL archive (database.py); database_url None: no archive.
    database_url: str | None = field(default=None, repr=False)  # may hold a password
    migrate_on_start: bool = False
    archive_flush_ms: int = 200
    archive_batch_rows: int = 500
    archive_queue_size: int = 10_000
    archive_messages: bool = True
    # Rate limits as (count, seconds); None: that limit is off.
    rate_limit_enabled: bool = True
    rate_limit_messages_user: tuple[int, float] | None = (10, 60.0)
    rate_limit_messages_ip: tuple[int, float] | None = (20, 60.0)
    # A burst of 60 new sockets, then one a second: page reloads and a NAT's
    # users pass; MAX_SOCKETS_IP bounds what one address holds at once.
    rate_limit_connections_ip: tuple[int, float] | None = (60, 60.0)
    # Failed joins and resumes per address, and per code (any address).
    rate_limit_join_failures_ip: tuple[int, float] | None = (10, 60.0)
    rate_limit_code_failures: tuple[int, float] | None = (10, 600.0)
    rate_limit_api_ip: tuple[int, float] | None = (60, 60.0)
    rate_limit_fail_closed: bool = False
    trusted_proxies: tuple[str, ...] = ()  # peers whose X-Forwarded-For is believed
    # Hostile clients (README "Security").
    max_sockets: int = 20_000  # open WebSockets per process; 0: no cap
    max_sockets_ip: int = 64  # per address (IPv6: per /64); 0: no cap
    idle_socket_timeout: float = 60.0  # a socket in no session is closed after this long
    ws_compression: bool = False  # permessage-deflate, inflation bounded by MAX_MESSAGE_BYTES
    http2_cleartext: bool = False  # h2c upgrade and prior-knowledge HTTP/2 on the plain port
    hash_key: str = field(default="", repr=False)  # keyed hashes of addresses and codes; empty: generated
    metrics_token: str = field(default="", repr=False)  # /metrics needs this bearer token (else loopback only)
    metrics_address: str | None = None  # host:port of a separate /metrics listener
    # Logs, probes and the drain (logging_setup.py, health.py).
    log_format: str = "auto"  # auto: console on a terminal, else json
    log_file: Path | None = None
    log_retention_days: int = 7
    log_ip_mode: str = "hash"  # hash: keyed hash of the address; truncate: its /24 or /48
    liveness_max_lag: float = 5.0
    ready_timeout: float = 1.0
    pre_drain_delay: float = 0.0

    @property
    def read_timeout(self) -> float:
        """Drop a peer that sent nothing, not even a pong, for this long."""
        return self.ping_interval * 1.5 + 1.0


DEFAULTS = Config()


def read_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and # comments skipped, quotes stripped."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{path}:{number}", raw, "KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def get(self, name: str, default: T, parse: Callable[[str], T], allowed: str) -> T:
        raw = self.env.get(name)
        if raw is None or raw.strip() == "":
            return default
        try:
            return parse(raw.strip())
        except ValueError:
            raise ConfigError(name, raw, allowed) from None

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        def parse(raw: str) -> int:
            value = int(raw)
            if not low <= value <= high:
                raise ValueError(raw)
            return value

        return self.get(name, default, parse, f"an integer from {low} to {high}")

    def seconds(self, name: str, default: float, low: float, high: float) -> float:
        def parse(raw: str) -> float:
            value = float(raw)
            if not low <= value <= high:  # also refuses nan
                raise ValueError(raw)
            return value

        return self.get(name, default, parse, f"seconds from {low:g} to {high:g}")

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        def parse(raw: str) -> str:
            if raw.upper() not in choices:
                raise ValueError(raw)
            return raw.upper()

        return self.get(name, default, parse, "one of " + ", ".join(choices))


def _origins(raw: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/").lower() for o in raw.split(",") if o.strip())
    for origin in origins:
        if origin != "*" and "://" not in origin:
            raise ValueError(origin)
    return () if "*" in origins else origins


_RATE_ALLOWED = "COUNT/SECONDS such as 10/60, or off"


def _rate(raw: str) -> tuple[int, float] | None:
    if raw.lower() in ("off", "0"):
        return None
    count, sep, seconds = raw.partition("/")
    limit, window = int(count), float(seconds)
    if not sep or not 1 <= limit <= 1_000_000 or not 0.001 <= window <= 86400:
        raise ValueError(raw)
    return limit, window


def _networks(raw: str) -> tuple[str, ...]:
    return tuple(str(ipaddress.ip_network(part.strip(), strict=False)) for part in raw.split(",") if part.strip())


def _redis_url(raw: str) -> str:
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(raw)
    return raw


def _flag(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw.lower() not in choices:
            raise ValueError(raw)
        return raw.lower()

    return parse


def _log_file(raw: str) -> Path:
    if Path(raw).is_dir():
        raise ValueError(raw)
    return Path(raw)


def _secret(raw: str) -> str:
    if len(raw) < 16:
        raise ValueError("too short")
    return raw


def _database_url(raw: str | None) -> str | None:
    """A postgresql:// URL; a bad one is reported with its password masked."""
    if raw is None or raw.strip() == "":
        return None
    url = raw.strip()
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises ValueError on a bad port
        if parts.scheme not in ("postgresql", "postgres") or any(c.isspace() for c in url):
            raise ValueError(url)
    except ValueError:
        shown = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
        allowed = "a postgresql:// URL such as postgresql://user@host:5432/tandem"
        raise ConfigError("DATABASE_URL", shown, allowed) from None
    return url


def _address(raw: str) -> str:
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not 1 <= int(port) <= 65535 or any(c.isspace() for c in raw):
        raise ValueError(raw)
    return raw


def _host(raw: str) -> str:
    if any(c.isspace() for c in raw):
        raise ValueError(raw)
    return raw


def load(env: Mapping[str, str] | None = None, dotenv: Path | None = Path(".env")) -> Config:
    """Build the Config from `env` (default: os.environ) over a .env file."""
    merged: dict[str, str] = read_dotenv(dotenv) if dotenv is not None else {}
    merged.update(os.environ if env is None else env)
    r = _Reader(merged)
    day = 86400.0 * 365
    config = Config(
        host=r.get("HOST", DEFAULTS.host, _host, "a host name or IP address"),
        port=r.integer("PORT", DEFAULTS.port, 0, 65535),
        data_dir=r.get("DATA_DIR", DEFAULTS.data_dir, Path, "a directory path"),
        max_message_bytes=r.integer("MAX_MESSAGE_BYTES", DEFAULTS.max_message_bytes, 256, 16 * 2**20),
        session_idle_timeout=r.seconds("SESSION_IDLE_TIMEOUT", DEFAULTS.session_idle_timeout, 1, day),
        session_ttl=r.seconds("SESSION_TTL", DEFAULTS.session_ttl, 1, day),
        history_size=r.integer("HISTORY_SIZE", DEFAULTS.history_size, 1, 100_000),
        allowed_origins=r.get(
            "ALLOWED_ORIGINS",
            DEFAULTS.allowed_origins,
            _origins,
            "* or a comma-separated list of origins such as https://app.example.com",
        ),
        ping_interval=r.seconds("PING_INTERVAL", DEFAULTS.ping_interval, 0.1, 3600),
        shutdown_grace=r.seconds("SHUTDOWN_GRACE", DEFAULTS.shutdown_grace, 0.5, 600),
        log_level=r.choice("LOG_LEVEL", DEFAULTS.log_level, LOG_LEVELS),
        code_length=r.integer("CODE_LENGTH", DEFAULTS.code_length, MIN_CODE_LENGTH, protocol.MAX_CODE_CHARS),
        send_queue_frames=r.integer("SEND_QUEUE_FRAMES", DEFAULTS.send_queue_frames, 8, 100_000),
        send_queue_bytes=r.integer("SEND_QUEUE_BYTES", DEFAULTS.send_queue_bytes, 65536, 2**30),
        max_consecutive_errors=r.integer("MAX_CONSECUTIVE_ERRORS", DEFAULTS.max_consecutive_errors, 1, 10_000),
        sweep_interval=r.seconds("SWEEP_INTERVAL", DEFAULTS.sweep_interval, 0.05, 3600),
        gc_full_interval=r.seconds("GC_FULL_INTERVAL", DEFAULTS.gc_full_interval, 0, 86400),
        sqlite_synchronous=r.choice("SQLITE_SYNCHRONOUS", DEFAULTS.sqlite_synchronous, ("NORMAL", "FULL")),
        redis_url=r.get("REDIS_URL", DEFAULTS.redis_url, _redis_url, "a redis://, rediss:// or unix:// URL"),
        redis_cluster=r.get("REDIS_CLUSTER", DEFAULTS.redis_cluster, _flag, "0 or 1"),
        database_url=_database_url(merged.get("DATABASE_URL")),
        migrate_on_start=r.get("MIGRATE_ON_START", DEFAULTS.migrate_on_start, _flag, "0 or 1"),
        archive_flush_ms=r.integer("ARCHIVE_FLUSH_MS", DEFAULTS.archive_flush_ms, 10, 60_000),
        archive_batch_rows=r.integer("ARCHIVE_BATCH_ROWS", DEFAULTS.archive_batch_rows, 1, 10_000),
        archive_queue_size=r.integer("ARCHIVE_QUEUE_SIZE", DEFAULTS.archive_queue_size, 10, 1_000_000),
        archive_messages=r.get("ARCHIVE_MESSAGES", DEFAULTS.archive_messages, _flag, "0 or 1"),
        rate_limit_enabled=r.get("RATE_LIMIT_ENABLED", DEFAULTS.rate_limit_enabled, _flag, "0 or 1"),
        rate_limit_messages_user=r.get(
            "RATE_LIMIT_MESSAGES_USER", DEFAULTS.rate_limit_messages_user, _rate, _RATE_ALLOWED
        ),
        rate_limit_messages_ip=r.get("RATE_LIMIT_MESSAGES_IP", DEFAULTS.rate_limit_messages_ip, _rate, _RATE_ALLOWED),
        rate_limit_connections_ip=r.get(
            "RATE_LIMIT_CONNECTIONS_IP", DEFAULTS.rate_limit_connections_ip, _rate, _RATE_ALLOWED
        ),
        rate_limit_join_failures_ip=r.get(
            "RATE_LIMIT_JOIN_FAILURES_IP", DEFAULTS.rate_limit_join_failures_ip, _rate, _RATE_ALLOWED
        ),
        rate_limit_code_failures=r.get(
            "RATE_LIMIT_CODE_FAILURES", DEFAULTS.rate_limit_code_failures, _rate, _RATE_ALLOWED
        ),
        rate_limit_api_ip=r.get("RATE_LIMIT_API_IP", DEFAULTS.rate_limit_api_ip, _rate, _RATE_ALLOWED),
        rate_limit_fail_closed=r.get("RATE_LIMIT_FAIL_CLOSED", DEFAULTS.rate_limit_fail_closed, _flag, "0 or 1"),
        trusted_proxies=r.get(
            "TRUSTED_PROXIES", DEFAULTS.trusted_proxies, _networks, "a comma-separated list of IP addresses or CIDRs"
        ),
        log_format=r.get(
            "LOG_FORMAT", DEFAULTS.log_format, _one_of("auto", "json", "console"), "auto, json or console"
        ),
        log_file=r.get("LOG_FILE", DEFAULTS.log_file, _log_file, "a file path (not a directory)"),
        log_retention_days=r.integer("LOG_RETENTION_DAYS", DEFAULTS.log_retention_days, 1, 3650),
        log_ip_mode=r.get("LOG_IP_MODE", DEFAULTS.log_ip_mode, _one_of("hash", "truncate"), "hash or truncate"),
        max_sockets=r.integer("MAX_SOCKETS", DEFAULTS.max_sockets, 0, 10_000_000),
        max_sockets_ip=r.integer("MAX_SOCKETS_IP", DEFAULTS.max_sockets_ip, 0, 10_000_000),
        idle_socket_timeout=r.seconds("IDLE_SOCKET_TIMEOUT", DEFAULTS.idle_socket_timeout, 0.1, 86400),
        ws_compression=r.get("WS_COMPRESSION", DEFAULTS.ws_compression, _flag, "0 or 1"),
        http2_cleartext=r.get("HTTP2_CLEARTEXT", DEFAULTS.http2_cleartext, _flag, "0 or 1"),
        hash_key=r.get("HASH_KEY", DEFAULTS.hash_key, _secret, "a secret of at least 16 characters"),
        metrics_token=r.get("METRICS_TOKEN", DEFAULTS.metrics_token, _secret, "a secret of at least 16 characters"),
        metrics_address=r.get(
            "METRICS_ADDRESS", DEFAULTS.metrics_address, _address, "HOST:PORT such as 127.0.0.1:9464"
        ),
        liveness_max_lag=r.seconds("LIVENESS_MAX_LAG", DEFAULTS.liveness_max_lag, 0.1, 3600),
        ready_timeout=r.seconds("READY_TIMEOUT", DEFAULTS.ready_timeout, 0.05, 60),
        pre_drain_delay=r.seconds("PRE_DRAIN_DELAY", DEFAULTS.pre_drain_delay, 0, 300),
    )
    if config.redis_cluster and config.redis_url is None:
        raise ConfigError("REDIS_CLUSTER", "1", "REDIS_URL to be set as well (a node of the cluster)")
    if config.pre_drain_delay > config.shutdown_grace / 2:
        raise ConfigError(
            "PRE_DRAIN_DELAY",
            f"{config.pre_drain_delay:g}",
            f"seconds from 0 to half of SHUTDOWN_GRACE ({config.shutdown_grace / 2:g})",
        )
    if config.send_queue_bytes < config.max_message_bytes * 2:
        raise ConfigError(
            "SEND_QUEUE_BYTES",
            str(config.send_queue_bytes),
            f"at least twice MAX_MESSAGE_BYTES ({config.max_message_bytes * 2})",
        )
    return config

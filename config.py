"""Tandem's settings: one frozen, typed Config, built once at start-up by load().

Each Config field is its setting's one entry (default, parser with unit and bounds, doc): load() reads
the environment and `.env` with them, and docs/configuration.md's table and .env.example are printed from them.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import sys
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

import mailer
import protocol

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
N = TypeVar("N", int, float)

YEAR = 86400.0 * 365


class ConfigError(ValueError):
    """A setting has a value Tandem cannot use."""

    def __init__(self, name: str, value: str, allowed: str) -> None:
        super().__init__(f"invalid setting {name}={value!r}: expected {allowed}")
        self.name = name


# --- kinds of value: how text becomes a value, its unit and its bounds --------------------------


def _refuse(raw: str) -> Any:
    raise ValueError(raw)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _show(value: object) -> str:
    """A value as .env writes it ("" for none)."""
    if isinstance(value, bool | int | float):
        return _number(value)
    return "" if value is None else ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


@dataclass(frozen=True)
class Kind(Generic[T_co]):
    """How a setting's text becomes its value; `parse` raises ValueError on a bad one."""

    parse: Callable[[str], T_co]
    unit: str  # seconds, bytes, ms, frames, flag, rate, text, url, ...
    allowed: str  # ends ConfigError's message: "expected <allowed>"
    range: str = ""  # the values accepted, for the docs ("": any of the unit)
    bounds: tuple[float, float] | None = None  # numeric kinds: lowest and highest accepted
    show: Callable[[Any], str] = _show
    mask: Callable[[str], str] = str  # a bad value as the error may show it


def _bounded(cast: Callable[[str], N], low: N, high: N, unit: str, what: str) -> Kind[N]:
    def parse(raw: str) -> N:
        value = cast(raw)
        return value if low <= value <= high else _refuse(raw)  # also refuses nan

    span = f"{_number(low)} to {_number(high)}"
    return Kind(parse, unit, f"{what} from {span}", span, (low, high))


def integer(low: int, high: int, unit: str) -> Kind[int]:
    return _bounded(int, low, high, unit, "an integer")


def seconds(low: float, high: float) -> Kind[float]:
    return _bounded(float, low, high, "seconds", "seconds")


def choice(*choices: str) -> Kind[str]:
    """One of `choices`, in any case; the value is spelled as in `choices`."""
    by_lower = {c.lower(): c for c in choices}

    def parse(raw: str) -> str:
        return by_lower[raw.lower()] if raw.lower() in by_lower else _refuse(raw)

    def listed(quote: str) -> str:
        return ", ".join(quote + c + quote for c in choices[:-1]) + f" or {quote}{choices[-1]}{quote}"

    return Kind(parse, "choice", listed(""), listed("`"))


def _flag(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    return False if raw.lower() in ("0", "false", "no", "off") else _refuse(raw)


RATE_COUNT, RATE_WINDOW = integer(1, 1_000_000, "count"), seconds(0.001, 86400)


def _rate(raw: str) -> tuple[int, float] | None:
    if raw.lower() in ("off", "0"):
        return None
    count, sep, window = raw.partition("/")
    return (RATE_COUNT.parse(count), RATE_WINDOW.parse(window)) if sep else _refuse(raw)


def _show_rate(rate: tuple[int, float] | None) -> str:
    return "off" if rate is None else f"{rate[0]}/{_number(rate[1])}"


def _host(raw: str) -> str:
    return _refuse(raw) if any(c.isspace() for c in raw) else raw


def _origins(raw: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/").lower() for o in raw.split(",") if o.strip())
    for origin in origins:
        if origin != "*" and "://" not in origin:
            raise ValueError(origin)
    return () if "*" in origins else origins


def _networks(raw: str) -> tuple[str, ...]:
    return tuple(str(ipaddress.ip_network(part.strip(), strict=False)) for part in raw.split(",") if part.strip())


def seed_urls(url: str) -> list[str]:
    """One URL per node of `redis://[auth@]host:port,host:port[/db][?options]`.

    Several nodes are a cluster's seeds: the client learns the cluster's
    layout from whichever answers first.
    """
    scheme, sep, rest = url.partition("://")
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    auth, at, hosts = rest[:end].rpartition("@")
    return [f"{scheme}{sep}{auth}{at}{host}{rest[end:]}" for host in hosts.split(",")]


def _redis_url(raw: str) -> str:
    if not raw.startswith(("redis://", "rediss://", "unix://")) or any(c.isspace() for c in raw):
        raise ValueError(raw)
    seeds = seed_urls(raw)
    for seed in seeds:  # every node of a list is HOST:PORT
        parts = urlsplit(seed)
        if len(seeds) > 1 and (parts.scheme == "unix" or not parts.hostname or parts.port is None):
            raise ValueError(raw)
    return raw


def _database_url(raw: str) -> str:
    parts = urlsplit(raw)
    parts.port  # noqa: B018  # raises ValueError on a bad port
    if parts.scheme not in ("postgresql", "postgres") or any(c.isspace() for c in raw):
        raise ValueError(raw)
    return raw


def _mask_password(raw: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", raw.strip())


def _log_file(raw: str) -> Path:
    return _refuse(raw) if Path(raw).is_dir() else Path(raw)


def _secret(raw: str) -> str:
    return _refuse(raw) if len(raw) < 16 else raw


def _http_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in raw):
        raise ValueError(raw)
    parts.port  # noqa: B018  # raises ValueError on a bad port
    return raw


def _project_url(raw: str) -> str:
    parts = urlsplit(_http_url(raw))
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise ValueError(raw)
    return raw.rstrip("/")


def _jwt_secret(raw: str) -> str:
    return _refuse(raw) if len(raw) < 32 else raw


def _words(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _motd(raw: str) -> str:
    return _refuse(raw) if len(raw) > 1000 or not raw.isprintable() else raw


def _smtp_url(raw: str) -> str:
    mailer.smtp_endpoint(raw)  # raises ValueError
    return raw


def _email_from(raw: str) -> str:
    mailer.sender(raw)  # raises ValueError
    return raw


def _public_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(raw)
    return _host(raw).rstrip("/")


def _address(raw: str) -> str:
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not 1 <= int(port) <= 65535 or any(c.isspace() for c in raw):
        raise ValueError(raw)
    return raw


FLAG = Kind(_flag, "flag", "0 or 1", "`0` or `1`")
RATE_RANGE = f"`COUNT/SECONDS`, {RATE_COUNT.range} per {RATE_WINDOW.range} s, or `off`"
RATE = Kind(_rate, "rate", "COUNT/SECONDS such as 10/60, or off", RATE_RANGE, show=_show_rate)
HOST_NAME = Kind(_host, "text", "a host name or IP address")
DIRECTORY = Kind(Path, "path", "a directory path")
LOG_PATH = Kind(_log_file, "path", "a file path (not a directory)")
ORIGINS = Kind(
    _origins, "list", "* or a comma-separated list of origins such as https://app.example.com", "comma-separated"
)
NETWORKS = Kind(_networks, "list", "a comma-separated list of IP addresses or CIDRs", "comma-separated")
REDIS_URL = Kind(
    _redis_url,
    "url",
    "a redis://, rediss:// or unix:// URL; a cluster's seeds as redis://HOST:PORT,HOST:PORT",
    mask=_mask_password,
)
POSTGRES_URL = Kind(
    _database_url, "url", "a postgresql:// URL such as postgresql://user@host:5432/tandem", mask=_mask_password
)
SECRET = Kind(
    _secret,
    "secret",
    "a secret of at least 16 characters",
    "at least 16 characters",
    mask=lambda raw: f"<{len(raw)} characters>",  # a refused secret is never echoed
)
HTTP_URL = Kind(_http_url, "url", "an http:// or https:// URL", mask=_mask_password)
PROJECT_URL = Kind(_project_url, "url", "a project URL such as https://abcdefgh.supabase.co (no path)")
JWT_SECRET = Kind(
    _jwt_secret,
    "secret",
    "a secret of at least 32 characters",
    "at least 32 characters",
    mask=lambda raw: f"<{len(raw)} characters>",
)
ISSUER = Kind(_host, "text", "text without spaces, such as https://issuer.example.com")
WORDS = Kind(_words, "list", "a comma-separated list", "comma-separated")
MOTD = Kind(_motd, "text", "printable text of at most 1000 characters", "at most 1000 characters")
LISTEN_ADDRESS = Kind(_address, "address", "HOST:PORT such as 127.0.0.1:9464", "`HOST:PORT`")
SMTP_URL = Kind(_smtp_url, "url", "smtp://[user:password@]host[:port] or smtps://…", mask=_mask_password)
EMAIL_FROM = Kind(_email_from, "address", "an address such as invites@example.com or Tandem <invites@example.com>")
PUBLIC_URL = Kind(
    _public_url, "url", "an http:// or https:// URL without query or fragment, such as https://pair.example.com"
)


# --- the table --------------------------------------------------------------------------------


def setting(default: T, kind: Kind[T], doc: str, *, section: str = "", secret: bool = False) -> T:
    """A Config field and its setting, named as the field in capitals. `section` starts a
    section of .env.example; `secret` keeps the value out of repr()."""
    return field(default=default, repr=not secret, metadata={"kind": kind, "doc": doc, "section": section})


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting; its environment variable is the field's name in capitals. After a change, regenerate
    .env.example and docs/configuration.md's table (`python config.py --help`); tests/test_config.py checks both."""

    host: str = setting("0.0.0.0", HOST_NAME, "address to listen on; `::` for IPv6 and IPv4", section="network")
    port: int = setting(3001, integer(0, 65535, "port"), "TCP port")
    allowed_origins: tuple[str, ...] = setting(
        (),
        ORIGINS,
        "origins such as `https://app.example.com` allowed to open a WebSocket; others get HTTP 403. Empty or `*`: any",
    )
    trusted_proxies: tuple[str, ...] = setting(
        (), NETWORKS, "addresses or CIDRs of proxies whose `X-Forwarded-For` names the client, e.g. the load balancer"
    )
    auth_jwt_secret: str = setting(
        "",
        JWT_SECRET,
        "shared secret of HS256 tokens (a Supabase project's legacy JWT secret); set, authentication is on",
        section="authentication (protocol 1.1): on when AUTH_JWT_SECRET, AUTH_JWKS_URL or SUPABASE_URL is set",
        secret=True,
    )
    auth_jwks_url: str | None = setting(
        None,
        HTTP_URL,
        "URL of the JSON Web Key Set that verifies RS256, ES256 and EdDSA tokens, fetched and cached; "
        "set, authentication is on",
    )
    supabase_url: str | None = setting(
        None,
        PROJECT_URL,
        "a Supabase project's URL: its JWKS (`/auth/v1/.well-known/jwks.json`), issuer (`/auth/v1`) and "
        "audience `authenticated`; set, authentication is on",
    )
    auth_audience: tuple[str, ...] = setting(
        (),
        WORDS,
        "accepted `aud` values (a token's must include one); empty: not checked (Supabase: `authenticated`)",
    )
    auth_issuer: str = setting("", ISSUER, "the required `iss`; empty: not checked (Supabase: the project's)")
    auth_leeway: float = setting(30.0, seconds(0, 300), "clock skew allowed on `exp` and `nbf`")
    auth_timeout: float = setting(
        10.0, seconds(0.1, 600), "time a new WebSocket has to authenticate before it is closed with 1008"
    )
    motd: str = setting("", MOTD, "a message of the day, sent in `welcome`; empty: none")
    max_message_bytes: int = setting(
        protocol.DEFAULT_MAX_MESSAGE_BYTES,
        integer(256, 16 * 2**20, "bytes"),
        "largest client frame in UTF-8 bytes; larger: close 1009",
        section="sessions and messages",
    )
    session_idle_timeout: float = setting(
        1800.0, seconds(1, YEAR), "time after the last message, join or resume that a session expires"
    )
    session_ttl: float = setting(86400.0, seconds(1, YEAR), "time after creation that a session expires at the latest")
    history_size: int = setting(
        100, integer(1, 100_000, "messages"), "messages kept per session for joiners and `session:resume`"
    )
    code_length: int = setting(
        8,
        integer(8, protocol.MAX_CODE_CHARS, "characters"),
        "characters in a session code; the 6 the protocol allows fall to guessing within hours (docs/security.md)",
    )
    ping_interval: float = setting(
        20.0, seconds(0.1, 3600), "time between server pings; a peer silent for `1.5 * PING_INTERVAL + 1` s is dropped"
    )
    send_queue_frames: int = setting(
        256, integer(8, 100_000, "frames"), "frames queued for one client before it is closed with 1013"
    )
    send_queue_bytes: int = setting(
        1024 * 1024,
        integer(65536, 2**30, "bytes"),
        "bytes queued for one client before it is closed with 1013; at least twice `MAX_MESSAGE_BYTES`",
    )
    send_timeout: float = setting(
        10.0,
        seconds(0.1, 600),
        "time one write to a client may take; a client that stops reading is disconnected after it",
    )
    max_consecutive_errors: int = setting(
        20, integer(1, 10_000, "errors"), "client errors in a row before the connection is closed with 1008"
    )
    sweep_interval: float = setting(1.0, seconds(0.05, 3600), "time between expiry sweeps")
    gc_full_interval: float = setting(
        300.0,
        seconds(0, 86400),
        "time between full garbage collections (young objects: every second); `0`: CPython's automatic collector",
    )
    data_dir: Path = setting(  # noqa: RUF009  # setting() is a dataclasses.field()
        Path("data"),
        DIRECTORY,
        "directory of the SQLite store (`tandem.sqlite3`), locked: one process per directory",
        section="the embedded store (SQLite)",
    )
    sqlite_synchronous: str = setting(
        "FULL",
        choice("NORMAL", "FULL"),
        "`FULL`: an ack survives power loss; `NORMAL`: it survives a crash of Tandem, not of the machine",
    )
    redis_url: str | None = setting(
        None,
        REDIS_URL,
        "`redis://[:password@]host:port[/db]`, `rediss://…` (TLS) or `unix://…`: sessions live in Redis, "
        "shared by instances; empty: SQLite",
        section="Redis (shared sessions across instances)",
        secret=True,
    )
    redis_cluster: bool = setting(
        False,
        FLAG,
        "`1`: `REDIS_URL` names nodes of a Redis Cluster, any number of them as seeds: "
        "`redis://[:password@]host:port,host:port,…`",
    )
    redis_ack_replicas: int = setting(
        0,
        integer(0, 16, "replicas"),
        "an ack waits until this many replicas hold the write too (Redis `WAIT`); 0: the master's write alone "
        '(docs/setup.md, "What an ack promises")',
    )
    redis_ack_timeout: float = setting(
        1.0,
        seconds(0.01, 1.5),
        "how long a write waits for `REDIS_ACK_REPLICAS`; past it the client gets `unavailable` and resends",
    )
    database_url: str | None = setting(
        None,
        POSTGRES_URL,
        "`postgresql://user:password@host:5432/dbname`: archive sessions, messages and analytics events "
        'in PostgreSQL (docs/setup.md, "PostgreSQL archive"); empty: no archive',
        section='PostgreSQL archive (docs/setup.md, "PostgreSQL archive")',
        secret=True,
    )
    migrate_on_start: bool = setting(
        False, FLAG, "`1`: apply `sql/` at start-up (one migrator at a time); `0`: run `python server.py migrate`"
    )
    archive_flush_ms: int = setting(
        200, integer(10, 60_000, "ms"), "the archive writes a batch this often, or once `ARCHIVE_BATCH_ROWS` rows wait"
    )
    archive_batch_rows: int = setting(
        500, integer(1, 10_000, "rows"), "rows waiting that make the archive write before `ARCHIVE_FLUSH_MS`"
    )
    archive_queue_size: int = setting(
        10_000,
        integer(10, 1_000_000, "rows"),
        "rows waiting for PostgreSQL at most; beyond, dropped and counted, never blocking the relay",
    )
    archive_messages: bool = setting(
        True, FLAG, "`0`: archive message metadata only (seq, sender, size, time), never bodies"
    )
    rate_limit_enabled: bool = setting(
        True,
        FLAG,
        "`0` turns every rate limit off (refused with `SMTP_URL`)",
        section="rate limits (COUNT/SECONDS, or off)",
    )
    rate_limit_messages_user: tuple[int, float] | None = setting((10, 60.0), RATE, "messages per member")
    rate_limit_messages_ip: tuple[int, float] | None = setting((20, 60.0), RATE, "messages per client address")
    rate_limit_connections_ip: tuple[int, float] | None = setting(
        (60, 60.0),
        RATE,
        "new WebSockets per client address, refused with HTTP 429 before the upgrade: a burst, then a rate, "
        "so that page reloads and a NAT's users pass",
    )
    rate_limit_join_failures_ip: tuple[int, float] | None = setting(
        (10, 60.0), RATE, "failed `session:join` and `session:resume` per client address, as when guessing codes"
    )
    rate_limit_code_failures: tuple[int, float] | None = setting(
        (10, 600.0),
        RATE,
        "failed `session:join` and `session:resume` against one code, from any address; past it the code "
        "refuses joins for the rest of the window, though members' own resumes still work",
    )
    rate_limit_api_ip: tuple[int, float] | None = setting((60, 60.0), RATE, "requests to `/api/*` per client address")
    rate_limit_email_session: tuple[int, float] | None = setting(
        (5, 86400.0), RATE, "e-mail invitations per session (`POST /api/send-email`); not `off` with `SMTP_URL`"
    )
    rate_limit_email_recipient: tuple[int, float] | None = setting(
        (3, 86400.0),
        RATE,
        "e-mail invitations per recipient address (lower case, without a `+tag`), from any session; "
        "not `off` with `SMTP_URL`",
    )
    rate_limit_fail_closed: bool = setting(
        False, FLAG, "`1`: while Redis is down, refuse what a limit guards instead of limiting per process"
    )
    admin_token: str = setting(
        "",
        SECRET,
        "`/api/debug/*` needs `Authorization: Bearer ADMIN_TOKEN`; empty: the admin API answers 404",
        section='admin API and e-mail invites (docs/operations.md, "Admin API"; docs/setup.md, "E-mail invites")',
        secret=True,
    )
    smtp_url: str | None = setting(
        None,
        SMTP_URL,
        "the mail server of `POST /api/send-email`: `smtp://[user:password@]host[:port]` (port 587, STARTTLS "
        "when offered) or `smtps://…` (TLS from the start, port 465); empty: no e-mail invites (404)",
        secret=True,
    )
    smtp_timeout: float = setting(
        10.0, seconds(0.5, 120), "time one invitation may take to send (connect, TLS, login, delivery); then HTTP 503"
    )
    email_from: str | None = setting(
        None,
        EMAIL_FROM,
        "the sender of invitations, `invites@example.com` or `Tandem <invites@example.com>`; required with `SMTP_URL`",
    )
    public_url: str | None = setting(
        None,
        PUBLIC_URL,
        "where people open the page, such as `https://pair.example.com`: invitations link to `PUBLIC_URL/#CODE`; "
        "required with `SMTP_URL`",
    )
    log_level: str = setting(
        "INFO", choice("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), "least severe records logged", section="logs"
    )
    log_format: str = setting(
        "auto",
        choice("auto", "json", "console"),
        "`json` (one object per line), `console` (coloured, for people) or `auto`: console on a terminal, else json",
    )
    log_file: Path | None = setting(  # noqa: RUF009  # setting() is a dataclasses.field()
        None,
        LOG_PATH,
        "also write JSON lines to this file, renamed `FILE.YYYY-MM-DD` at UTC midnight; empty: stdout only",
    )
    log_retention_days: int = setting(7, integer(1, 3650, "days"), "how long rotated log files are kept")
    log_ip_mode: str = setting(
        "hash",
        choice("hash", "truncate"),
        "how a client address appears in logs: `hash` (`ip-` + 16 hex of a keyed hash) or `truncate` to its /24 or /48",
    )
    max_sockets: int = setting(
        20_000,
        integer(0, 10_000_000, "sockets"),
        "open WebSockets per process; beyond, HTTP 503 before the upgrade. `0`: no cap",
        section="hostile clients (docs/security.md)",
    )
    max_sockets_ip: int = setting(
        64,
        integer(0, 10_000_000, "sockets"),
        "open WebSockets per client address (IPv6: per /64); beyond, HTTP 503. `0`: no cap",
    )
    idle_socket_timeout: float = setting(60.0, seconds(0.1, 86400), "time a WebSocket in no session may stay open")
    ws_compression: bool = setting(
        False, FLAG, "`1`: accept permessage-deflate (inflation stops at `MAX_MESSAGE_BYTES`); `0`: never negotiate it"
    )
    http2_cleartext: bool = setting(
        False, FLAG, "`1`: accept cleartext HTTP/2 (h2c upgrade, prior knowledge) on the plain port"
    )
    hash_key: str = setting(
        "",
        SECRET,
        "the key of every keyed hash Tandem makes (addresses and codes in logs, rate-limit keys). Empty: "
        "generated; on Redis one key stored there and shared by every instance, else one per process. "
        "Set the same key on every instance to correlate logs",
        secret=True,
    )
    metrics_token: str = setting(
        "",
        SECRET,
        "`/metrics` on the main port needs `Authorization: Bearer METRICS_TOKEN`; empty: only loopback clients "
        "may read it there",
        secret=True,
    )
    metrics_address: str | None = setting(
        None,
        LISTEN_ADDRESS,
        "a second listener serving `/metrics` and the probes without a token, nothing else; bind it to an "
        "internal address",
    )
    liveness_max_lag: float = setting(
        5.0, seconds(0.1, 3600), "event-loop lag after which `/health/live` fails", section="probes and shutdown"
    )
    ready_timeout: float = setting(
        1.0,
        seconds(0.05, 60),
        "time each readiness check (store, database) may take before `/health/ready` fails; "
        "keep it below the probe's own timeout",
    )
    pre_drain_delay: float = setting(
        0.0,
        seconds(0, 300),
        "time from SIGTERM (readiness fails at once) to the drain (sockets closed with 1012), for load "
        "balancers to stop sending clients first; at most half of `SHUTDOWN_GRACE`",
    )
    shutdown_grace: float = setting(10.0, seconds(0.5, 600), "time from SIGTERM/SIGINT to exit")

    @property
    def auth_enabled(self) -> bool:
        """Authentication is on exactly when a key source is set (PROTOCOL.md, Authentication)."""
        return bool(self.auth_jwt_secret or self.auth_jwks_url or self.supabase_url)

    @property
    def read_timeout(self) -> float:
        """Drop a peer that sent nothing, not even a pong, for this long."""
        return self.ping_interval * 1.5 + 1.0


DEFAULTS = Config()


@dataclass(frozen=True)
class Setting:
    """One entry of the table, as load() and the generators read it."""

    name: str  # the environment variable
    field: str  # the Config attribute
    default: Any
    kind: Kind[Any]
    doc: str
    section: str  # the section of .env.example it starts, if any

    def read(self, env: Mapping[str, str]) -> Any:
        raw = env.get(self.name)
        if raw is None or raw.strip() == "":
            return self.default
        try:
            return self.kind.parse(raw.strip())
        except ValueError:
            raise ConfigError(self.name, self.kind.mask(raw), self.kind.allowed) from None

    def meaning(self, keep: str = " ") -> str:
        """The doc, then the unit and the range joined by `keep`."""
        spec = f"{self.kind.unit}: {self.kind.range}" if self.kind.range else self.kind.unit
        return f"{self.doc} ({spec.replace(' ', keep)})"


SETTINGS = tuple(Setting(f.name.upper(), f.name, f.default, **f.metadata) for f in fields(Config))


# --- reading --------------------------------------------------------------------------------------


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


def dotenv_warnings(path: Path) -> list[tuple[int, str, str]]:
    """(line, key, closest setting) for each key of a .env file that looks meant
    for Tandem but is not a setting: a misspelt name (`PROT`) or `TANDEM_…`.
    Other keys (a .env shared with other tools) are left alone."""
    if not path.is_file():
        return []
    names = [s.name for s in SETTINGS]
    found = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        key = raw.strip().removeprefix("export ").partition("=")[0].strip()
        if not key or key.startswith("#") or key in names:
            continue
        close = difflib.get_close_matches(key.upper().removeprefix("TANDEM_"), names, n=1, cutoff=0.75)
        if close or key.upper().startswith("TANDEM"):
            found.append((number, key, close[0] if close else ""))
    return found


def load(env: Mapping[str, str] | None = None, dotenv: Path | None = Path(".env")) -> Config:
    """Build the Config from `env` (default: os.environ) over a .env file."""
    merged: dict[str, str] = read_dotenv(dotenv) if dotenv is not None else {}
    merged.update(os.environ if env is None else env)
    config = Config(**{s.field: s.read(merged) for s in SETTINGS})
    if config.redis_cluster and config.redis_url is None:
        raise ConfigError("REDIS_CLUSTER", "1", "REDIS_URL to be set as well (a node of the cluster)")
    if config.redis_url is not None and len(seed_urls(config.redis_url)) > 1 and not config.redis_cluster:
        raise ConfigError("REDIS_URL", _mask_password(config.redis_url), "one node, or REDIS_CLUSTER=1 for several")
    if config.pre_drain_delay > config.shutdown_grace / 2:
        raise ConfigError(
            "PRE_DRAIN_DELAY",
            f"{config.pre_drain_delay:g}",
            f"seconds from 0 to half of SHUTDOWN_GRACE ({config.shutdown_grace / 2:g})",
        )
    _check_auth(config)
    _check_email(config)
    if config.send_queue_bytes < config.max_message_bytes * 2:
        raise ConfigError(
            "SEND_QUEUE_BYTES",
            str(config.send_queue_bytes),
            f"at least twice MAX_MESSAGE_BYTES ({config.max_message_bytes * 2})",
        )
    return config


AUTH_KEY_SOURCES = "AUTH_JWT_SECRET, AUTH_JWKS_URL or SUPABASE_URL"


def _check_auth(config: Config) -> None:
    """Authentication settings that contradict each other, or that would do nothing."""
    if config.auth_jwks_url is not None and config.supabase_url is not None:
        raise ConfigError(
            "AUTH_JWKS_URL", _mask_password(config.auth_jwks_url), "empty when SUPABASE_URL is set (it names the JWKS)"
        )
    if config.auth_enabled:
        return
    for name in ("AUTH_AUDIENCE", "AUTH_ISSUER", "AUTH_LEEWAY", "AUTH_TIMEOUT"):
        value = getattr(config, name.lower())
        if value != getattr(DEFAULTS, name.lower()):  # set by an operator who expects authentication: it is off
            shown = _show(value)
            raise ConfigError(name, shown, f"{AUTH_KEY_SOURCES} to be set as well (without one authentication is off)")


def _check_email(config: Config) -> None:
    """With SMTP_URL: a sender, a page to link to, and every limit of `/api/send-email` on,
    so that Tandem can never be used to relay spam."""
    if config.smtp_url is None:
        return
    for name in ("EMAIL_FROM", "PUBLIC_URL"):
        if getattr(config, name.lower()) is None:
            raise ConfigError(name, "", "a value when SMTP_URL is set")
    if not config.rate_limit_enabled:
        raise ConfigError("RATE_LIMIT_ENABLED", "0", "1 when SMTP_URL is set (the e-mail limits stop spam)")
    for name in ("RATE_LIMIT_API_IP", "RATE_LIMIT_EMAIL_SESSION", "RATE_LIMIT_EMAIL_RECIPIENT"):
        if getattr(config, name.lower()) is None:
            raise ConfigError(name, "off", "COUNT/SECONDS when SMTP_URL is set (the e-mail limits stop spam)")


# --- the generated documents ----------------------------------------------------------------------

ENV_HEADER = """\
# Tandem's settings, each at its default. Copy to `.env` in the directory the server runs from (the
# environment wins over the file) and change what you need; an empty value means the default. A bad
# value stops the server with exit code 2 and one line naming the setting. docs/configuration.md has
# the same list as a table; both are printed by config.py (--env-example, --markdown): edit it there.
"""


def markdown() -> str:
    """The settings table of docs/configuration.md."""
    lines = ["| setting | default | meaning |", "| --- | --- | --- |"]
    for s in SETTINGS:
        shown = s.kind.show(s.default)
        lines.append(f"| `{s.name}` | {f'`{shown}`' if shown else '(empty)'} | {s.meaning()} |")
    return "\n".join(lines) + "\n"


def env_example() -> str:
    """.env.example: every setting at its default, under a comment, in sections."""
    lines = [ENV_HEADER.rstrip("\n")]
    for s in SETTINGS:
        if s.section:
            lines += ["", f"# --- {s.section} ".ljust(88, "-")]
        comment = s.meaning(keep="\0").replace("`", "") + "."  # \0: the unit and range stay on one line
        comment = comment if s.doc.startswith("`") else comment[0].upper() + comment[1:]
        wrapped = textwrap.wrap(comment, 100, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False)
        lines += [line.replace("\0", " ") for line in wrapped]
        lines.append(f"{s.name}={s.kind.show(s.default)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    outputs = {"--markdown": markdown, "--env-example": env_example}
    if len(sys.argv) != 2 or sys.argv[1] not in outputs:
        usage = "usage: python config.py --markdown (docs/configuration.md) | --env-example (> .env.example)"
        print(usage, file=sys.stderr)
        sys.exit(2)
    sys.stdout.write(outputs[sys.argv[1]]())

"""Settings: the only reader of configuration files and ``SIGNER_*`` environment variables.

A TOML file gives the settings; ``SIGNER_<SECTION>_<NAME>`` environment variables override single
non-secret values (``SIGNER_SERVER_LISTEN=127.0.0.1:6000``). Secrets never come from here: the
token PIN is read from the file named by ``token.pin_file``, by :mod:`signer._internal.token`.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import json
import math
import os
import re
import stat
import threading
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from signer._internal.metrics import parse_address
from signer.errors import ConfigError, shown
from signer.keys import SCOPE_NAME

P11KIT_CLIENT_MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
ENV_PREFIX = "SIGNER_"
DAY = 24 * 3600
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


@dataclass(frozen=True)
class ServerConfig:
    # The Unix socket local callers connect to (their uid is their identity). The service never
    # listens on a network: remote callers come through the TLS front.
    listen: str = "unix:var/run/signer.sock"
    # Permissions of the Unix sockets (octal).
    socket_mode: str = "0660"
    # The socket the TLS front connects to; identity headers are believed there only. Keep it
    # where only the front's user can reach it. Empty: no front.
    front_socket: str = ""
    # Its permissions: owner only by default (the front runs as the service's user); 0660 with
    # front_socket_group, the front's own user's group, when the front runs as its own user.
    front_socket_mode: str = "0600"
    front_socket_group: str = ""
    # Who may do what (signer._internal.policy); reloaded on SIGHUP. Empty: every call is refused.
    policy_file: str = ""
    # Largest message accepted by Sign/Verify; larger ones are refused with INVALID_ARGUMENT.
    max_message_bytes: int = 1024 * 1024
    # A caller whose calls were refused this many times (bad input, no permission) within
    # refusal_window_seconds gets RESOURCE_EXHAUSTED for the rest of the window, without a log
    # line or a record per call (one record counts them): what one caller can make the service
    # write is bounded (signer._internal.throttle). 0 turns it off.
    refused_calls_budget: int = 50
    refusal_window_seconds: float = 60.0
    # Local connections (the Unix socket): how many one uid, and all together, may hold open,
    # and how long one may sit with no traffic before it is closed (signer._internal.relay.Limits).
    # The total is also kept within the process's descriptor limit (three per connection).
    max_connections_per_uid: int = 64
    max_connections: int = 1024
    idle_connection_seconds: float = 300.0
    # Calls one caller, and all together, may have running at once (RESOURCE_EXHAUSTED
    # beyond): a call whose caller has gone still runs to its end and is recorded.
    max_calls_per_caller: int = 128
    max_calls_in_flight: int = 500
    # How long graceful shutdown waits for in-flight calls.
    grace_seconds: float = 10.0
    # /proc/self/coredump_filter, set deliberately at start-up: the service's dumps are meant
    # to be useful (they hold no key), so anonymous private+shared memory and ELF headers go in
    # (0x33, the kernel default); file-backed pages do not, hugetlb does not. "" leaves it alone.
    coredump_filter: str = "0x33"
    # glibc M_PERTURB: free() overwrites released heap chunks, so C buffers that carried the PIN
    # or a payload (p11-kit's RPC buffers, gRPC slices) do not linger in dumps.
    perturb_freed_memory: bool = True


@dataclass(frozen=True)
class TokenConfig:
    module: str = P11KIT_CLIENT_MODULE
    # P11_KIT_SERVER_ADDRESS for p11-kit-client.so; empty leaves the environment alone.
    server_address: str = ""
    # RFC 7512 URI naming the token (token=, serial=, manufacturer=, model= are honoured).
    uri: str = "pkcs11:token=signer"
    pin_file: str = ""
    sessions: int = 8
    # Threads that make the signing path's token calls (Sign, Verify, SignJWT, SignBatch
    # chunks, metadata reads); each takes the quick calls queued (up to 8) before it sleeps
    # again. Two keep a local token host busy on a small machine with the fewest thread
    # hand-offs (docs/benchmarks.md); a network HSM whose calls take milliseconds wants more,
    # up to ``sessions`` (4 more sessions serve key generation and other administrative calls).
    lanes: int = 2
    # Whether the module may be called from several threads at once. "auto": yes for
    # p11-kit-client.so (it locks internally); no for any other module, because python-pkcs11
    # calls C_Initialize(NULL), which tells a module such as SoftHSM2 it need not lock.
    thread_safe: str = "auto"
    health_interval_seconds: float = 1.0
    # After a failed connection attempt the next waits twice as long, up to this.
    reconnect_max_seconds: float = 5.0
    # A health check unanswered this long means the token host has stopped answering (frozen,
    # hung): health NOT_SERVING and calls fail fast until it answers again. Well above what a
    # busy token takes: SoftHSM2 holds a health check while another connection generates an
    # RSA-4096 key (seconds; the soak saw checks wait 3 s at 400 objects under load).
    stall_seconds: float = 15.0
    # Failed logins in a row after which the service stops trying until it is restarted. An
    # HSM locks its user after a few (three is common); after one failure the service tries
    # again only when pin_file changes (signer/_internal/token/_logins.py).
    max_failed_logins: int = 2
    # Sign in two PKCS#11 calls (C_SignInit, C_Sign into a buffer large enough) rather than
    # python-pkcs11's three, where its module instance can be reached safely
    # (signer/_internal/token/_direct.py): one round trip fewer to the token per signature.
    direct_sign: bool = True

    @property
    def admin_connection(self) -> bool:
        """Whether slow work (key generation, unwrapping) gets a connection of its own.
        p11-kit-client.so makes a new client, with its own connection to the token host, for
        each module instance; most modules hand every caller one shared instance, which a
        second C_Initialize would not separate."""
        return Path(self.module).name == Path(P11KIT_CLIENT_MODULE).name

    @property
    def concurrent(self) -> bool:
        if self.thread_safe == "auto":
            return Path(self.module).name == Path(P11KIT_CLIENT_MODULE).name
        return self.thread_safe == "true"


# audit.chain: a replica's name in its database's audit log (file names and lock names too).
CHAIN_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")

# What [store] path accepts besides a file (signer._internal.store.POSTGRES_SCHEMES).
STORE_URL_SCHEMES = ("postgresql://", "postgres://")


@dataclass(frozen=True)
class StoreConfig:
    # An SQLite file (one machine), or "postgresql://..." (replicas sharing a database).
    path: str = "var/signer.db"


@dataclass(frozen=True)
class KeysConfig:
    destruction_waiting_period_seconds: int = 7 * DAY
    # A caller may ask for a longer waiting period, never a shorter one than this.
    min_destruction_waiting_period_seconds: int = DAY
    reaper_interval_seconds: float = 60.0
    # How long an import token (and its wrapping key in the token) can be used for an import.
    import_token_lifetime_seconds: int = DAY
    # Import tokens live at once, across callers (each is an RSA-4096 key pair in the token, and
    # generating one is the token's slowest job); a caller holds at most two.
    max_live_import_tokens: int = 32


@dataclass(frozen=True)
class AuditConfig:
    """The audit log (signer._internal.audit): every RPC outcome, hash-chained, checkpoints
    signed."""

    path: str = "var/audit.db"
    checkpoint_every: int = 1000
    checkpoint_interval_seconds: float = 10.0
    # The most records ever left under no signed checkpoint: the writer signs one first or, when
    # it cannot, refuses new calls from three quarters of it; 'verify' and the writer at start
    # hold a log to it (a log whose checkpoints were removed cannot pass for a young one). At
    # least four times server.max_calls_in_flight (the calls that may still finish meanwhile).
    max_unsigned_records: int = 2000
    # Witnesses outside the database: every checkpoint is also appended to this file (put it on
    # another mount, chattr +a) and/or sent to this syslog socket (e.g. /dev/log). 'verify'
    # checks the log against them (signer._internal.audit._witness). "" for none.
    witness_file: str = ""
    witness_syslog: str = ""
    # The audit key's public half, pinned at first start; "" means PATH.key.pem.
    public_key_file: str = ""
    # Where 'signer audit-log archive' moves old segments; "" means PATH.archive/.
    archive_dir: str = ""
    # With a postgresql:// path: this service's chain of the database's log. Replicas sharing
    # one database each write their own chain (its own audit key, pin and witness), whose
    # checkpoints name the others' (README "Replicas"). "" for a database with one writer.
    chain: str = ""

    @property
    def pinned_key(self) -> Path:
        return Path(self.public_key_file or f"{self.path}.key.pem")

    @property
    def archives(self) -> Path:
        return Path(self.archive_dir or f"{self.path}.archive")


@dataclass(frozen=True)
class FrontConfig:
    """The mTLS front (``signer front serve``): nginx terminating TLS with its key in the token,
    proxying to the service's Unix socket. The service itself never reads this section."""

    listen: str = "127.0.0.1:50051"
    # The endpoint's certificate; its private key is ``key_uri`` in the TLS token.
    certificate: str = ""
    key_uri: str = "pkcs11:token=signer-tls;object=tls-endpoint;type=private"
    # The TLS token's PIN file (read by libp11 inside nginx) and p11-kit server address.
    pin_file: str = ""
    server_address: str = ""
    # CA certificate(s) a client certificate must chain to; there is no way in without one.
    client_ca: str = ""
    # The service's Unix socket, "unix:/path"; with replicas, every replica's front socket,
    # separated by commas ("unix:/run/signer/r1/front.sock, unix:/run/signer/r2/front.sock"):
    # one nginx upstream, passive health, retries where the RPC allows (README "Replicas").
    # A string, not a TOML array, so that SIGNER_FRONT_UPSTREAM overrides it like any setting.
    upstream: str = ""
    # nginx.conf, openssl.cnf, the error log and nginx's temporary files go here.
    workdir: str = "var/front"
    nginx: str = "nginx"
    # The user nginx runs as when started by root (its workdir becomes that user's); "" runs it
    # as whoever starts it. 'signer run' as root uses its own system user, signer-front, so the
    # internet-facing process can read no PIN but the TLS token's and reach no socket but the
    # front's and the TLS token's.
    user: str = ""
    # Issuers (README "Issuers over HTTPS"): host:port of a second TLS server for relying
    # parties, with the same key and certificate but no client certificate asked and no way to
    # the service: it serves only issuers_dir's JWKS and OpenID configuration files (the
    # service's jwt.issuers_dir, read-only here). "" for none.
    issuers_listen: str = ""
    issuers_dir: str = ""
    # Cache-Control max-age of those documents, in seconds: keep jwt.rotation_lead_seconds
    # above it plus the publish interval.
    issuers_max_age: int = 300

    @property
    def upstreams(self) -> tuple[str, ...]:
        """Each replica's socket as given in ``upstream`` ("unix:/path"), in order."""
        return tuple(part.strip() for part in self.upstream.split(",") if part.strip())


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics (signer._internal.metrics), on a TCP listener of their own, never the
    signing socket."""

    # host:port ("127.0.0.1:9464", "[::1]:9464"); empty: no metrics, no listener. Off unless
    # set, so a deployment that listens on Unix sockets only opens no TCP port of its own accord.
    listen: str = ""


# An issuer's URL: https, a host (and port), one path segment naming the issuer's directory
# under jwt.issuers_dir, which the front serves at /<segment>/ (README "Issuers").
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
ISSUER_URL = re.compile(
    rf"https://({_LABEL}(?:\.{_LABEL})*|\[([0-9a-f:.]+)\])(?::([1-9][0-9]{{0,4}}))?"
    r"/([a-z0-9][a-z0-9-]{0,62})"
)


@dataclass(frozen=True)
class JwtConfig:
    """Issuers (README "Issuers over HTTPS"): one issuer URL per key scope, whose JWKS and
    OpenID configuration the service publishes as files for the front to serve to relying
    parties. The lead time, grace and token lifetime rules apply to the scopes named here."""

    # "SCOPE=https://HOST[:PORT]/SLUG" pairs separated by commas; each scope at most once, each
    # URL (and slug) at most once. A string, not a TOML table, so that SIGNER_JWT_ISSUERS
    # overrides it like any setting. "" publishes nothing.
    issuers: str = ""
    # Where the service writes SLUG/jwks.json and SLUG/.well-known/openid-configuration; the
    # front's issuers_dir (read-only there).
    issuers_dir: str = "var/issuers"
    # The service rewrites changed documents this often, and at once after a key change it made.
    publish_interval_seconds: float = 10.0
    # RotateKey on an issuer's scope publishes the new version this long before it becomes
    # primary: at least publish_interval_seconds plus the longest a verifier caches a JWKS
    # (Cache-Control max-age 300 s; PyJWKClient 300 s; Node's jose 600 s by default).
    rotation_lead_seconds: float = 3600.0
    # A version that stopped being primary stays in its issuer's JWKS this long: at least
    # max_token_lifetime_seconds plus the verifiers' leeway and publish_interval_seconds.
    retired_grace_seconds: float = 7200.0
    # SignJWT with an issuer's key refuses claims without "exp" or with "exp" further ahead.
    max_token_lifetime_seconds: float = 3600.0

    @property
    def issuer_of(self) -> Mapping[str, str]:
        """scope -> issuer URL, as configured (checked by load); parsed once per setting, as
        SignJWT reads it on every call."""
        return _issuers(self.issuers)


@functools.lru_cache(maxsize=8)
def _issuers(setting: str) -> Mapping[str, str]:
    pairs = (part.split("=", 1) for part in setting.split(",") if part.strip())
    return types.MappingProxyType({scope.strip(): url.strip() for scope, url in pairs})


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    token: TokenConfig = field(default_factory=TokenConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    front: FrontConfig = field(default_factory=FrontConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    jwt: JwtConfig = field(default_factory=JwtConfig)


T = TypeVar("T")


def _coerce(section: str, name: str, raw: Any, typ: type[Any]) -> Any:
    where = f"{section}.{name}"
    value = _coerce_type(where, raw, typ)
    # TOML integers are 64-bit (tomllib takes any size); floats here are durations, which
    # threading and asyncio can wait for only up to TIMEOUT_MAX, and nan compares false with
    # every bound _validate checks.
    if typ is int and not INT64_MIN <= value <= INT64_MAX:
        raise ConfigError(f"setting {where} is out of range (a 64-bit integer), got {shown(raw)}")
    if typ is float and not (math.isfinite(value) and abs(value) <= threading.TIMEOUT_MAX):
        raise ConfigError(
            f"setting {where} must be a finite number of seconds (at most "
            f"{threading.TIMEOUT_MAX:.0f}), got {shown(raw)}"
        )
    return value


def _coerce_type(where: str, raw: Any, typ: type[Any]) -> Any:
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0"):
            return raw.lower() in ("true", "1")
    elif typ is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str):
            try:
                return int(raw)
            except ValueError:
                pass
    elif typ is float:
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            try:
                return float(raw)
            except OverflowError:  # an integer beyond any float
                raise ConfigError(f"setting {where} is out of range, got {shown(raw)}") from None
        if isinstance(raw, str):
            try:
                return float(raw)
            except ValueError:
                pass
    elif typ is str and isinstance(raw, str):
        return raw
    raise ConfigError(f"setting {where} must be {typ.__name__}, got {shown(raw)}")


def _section(cls: type[T], name: str, values: Mapping[str, Any], env: Mapping[str, str]) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(values) - set(fields)
    if unknown:
        raise _Named(
            f"unknown setting(s) in [{name}]: {', '.join(shown(u) for u in sorted(unknown))}",
            name,
            sorted(unknown)[0],
        )
    kwargs: dict[str, Any] = {}
    for fname, f in fields.items():
        typ = type(f.default) if f.default is not dataclasses.MISSING else str
        env_name = f"{ENV_PREFIX}{name}_{fname}".upper()
        if env_name in env:
            kwargs[fname] = _coerce(name, fname, env[env_name], typ)
        elif fname in values:
            kwargs[fname] = _coerce(name, fname, values[fname], typ)
    return cls(**kwargs)


def dump(cfg: Config) -> str:
    """``cfg`` as the TOML that :func:`load` reads back into the same Config: every setting."""
    lines: list[str] = []
    for section in dataclasses.fields(cfg):
        lines.append(f"[{section.name}]")
        for name, value in vars(getattr(cfg, section.name)).items():
            if isinstance(value, bool):
                lines.append(f"{name} = {str(value).lower()}")
            elif isinstance(value, str):
                lines.append(f"{name} = {json.dumps(value)}")  # JSON strings are TOML strings
            else:
                lines.append(f"{name} = {value!r}")
        lines.append("")
    return "\n".join(lines)


MAX_TOML_BYTES = 1 << 20
"""A configuration or policy file larger than this is refused: thousands of grants fit, and the
policy is re-read on SIGHUP in the service's event loop, which must not stall on it."""


def read_text(path: str | Path, what: str = "configuration file") -> str:
    """A configuration or policy file's text. Every way it can be unreadable is a ConfigError
    naming ``what`` and the file, and the line where one is known: the service then keeps its
    old policy (SIGHUP) or does not start."""
    try:
        # Not blocking: a FIFO with no writer must not hold the service's event loop.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be opened: {exc.strerror or exc}") from None
    try:
        with open(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise ConfigError(f"{what} {path} is not a regular file")
            raw = fh.read(MAX_TOML_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    if len(raw) > MAX_TOML_BYTES:
        raise ConfigError(f"{what} {path} is larger than {MAX_TOML_BYTES} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            f"{what} {path} is not UTF-8 text (byte {raw[exc.start]:#04x} at line {line}, "
            f"column {column})"
        ) from None


def parse_toml(text: str, where: str) -> dict[str, Any]:
    """TOML text as a dict; ``where`` ('policy file P') starts every error message."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message ends "(at line L, column C)"
        last = len(text.splitlines()) or 1
        at_end = f" (line {last}, the last)" if "end of document" in str(exc) else ""
        raise ConfigError(f"{where} is not valid TOML: {exc}{at_end}") from None
    except ValueError as exc:
        # tomllib lets int()'s own refusal through: an integer of more than 4300 digits.
        line = _first_line(text, re.compile(r"[0-9_]{4300}"))
        raise ConfigError(f"{where} is not valid TOML: {exc}{line}") from None
    except RecursionError:
        # Arrays or inline tables nested about a thousand deep exhaust tomllib's recursion.
        lines = text.splitlines() or [""]
        deepest = max(range(len(lines)), key=lambda i: lines[i].count("[") + lines[i].count("{"))
        raise ConfigError(
            f"{where} is not valid TOML: arrays or tables nested too deeply (line {deepest + 1})"
        ) from None


def _first_line(text: str, pattern: re.Pattern[str]) -> str:
    m = pattern.search(text)
    return f" (line {text.count(chr(10), 0, m.start()) + 1})" if m else ""


def line_of(text: str, table: str, key: str | None = None, index: int = 1) -> int | None:
    """The line of ``[table]`` (or the ``index``-th ``[[table]]``), or of ``key = ...`` in it: for
    a message about a value that parsed but is wrong. None when the file says it another way
    (dotted keys, inline tables): the message then names the setting only."""
    header = re.compile(r"\s*(\[\[?)\s*([A-Za-z0-9_-]+)\s*\]\]?\s*(#.*)?$")
    assign = re.compile(r"\s*([A-Za-z0-9_-]+)\s*=")
    current, seen, found = None, 0, None
    for n, line in enumerate(text.splitlines(), 1):
        m = header.match(line)
        if m:
            current = m.group(2)
            if current == table:
                seen += 1
                if seen == index and key is None:
                    return n
            continue
        if key is not None and current == table and seen == index:
            m = assign.match(line)
            if m and m.group(1) == key:
                found = n
                break
    return found


def load(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Reads the TOML file at ``path`` (if any), then applies ``SIGNER_*`` overrides. Every
    problem is a ConfigError; one about a setting the file gives names its line."""
    env = os.environ if env is None else env
    text = read_text(path) if path is not None else ""
    try:
        return _load(path, parse_toml(text, f"configuration file {path}"), env)
    except ConfigError as exc:
        line = _setting_line(text, exc, env)
        if line is None:
            raise
        raise ConfigError(f"{exc.message} ({path} line {line})") from None


_SETTING = re.compile(r"\b(server|token|store|keys|audit|front|metrics|jwt)\.([a-z_]+)\b|\[(\w+)\]")


class _Named(ConfigError):
    """A ConfigError about a table or a setting the file has (one the message alone does not
    locate: an unknown name)."""

    def __init__(self, message: str, table: str, key: str | None = None) -> None:
        super().__init__(message)
        self.table, self.key = table, key


def _setting_line(text: str, error: ConfigError, env: Mapping[str, str]) -> int | None:
    """The line of what ``error`` is about: the name it carries, else the first setting
    (``section.name``) or table (``[section]``) its message names that the file gives and no
    environment variable overrides."""
    if isinstance(error, _Named):
        return line_of(text, error.table, error.key)
    message = error.message
    for m in _SETTING.finditer(message):
        section, name, table = m.groups()
        if table is not None:
            line = line_of(text, table)
        elif f"{ENV_PREFIX}{section}_{name}".upper() in env:
            continue
        else:
            line = line_of(text, section, name)
        if line is not None:
            return line
    return None


def _load(path: str | Path | None, data: dict[str, Any], env: Mapping[str, str]) -> Config:
    sections = {
        "server": ServerConfig,
        "token": TokenConfig,
        "store": StoreConfig,
        "keys": KeysConfig,
        "audit": AuditConfig,
        "front": FrontConfig,
        "metrics": MetricsConfig,
        "jwt": JwtConfig,
    }
    unknown = set(data) - set(sections)
    if unknown:
        raise _Named(
            f"unknown section(s) in {path}: {', '.join(shown(u) for u in sorted(unknown))}",
            sorted(unknown)[0],
        )
    built: dict[str, Any] = {}
    for name, cls in sections.items():
        values = data.get(name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"[{name}] in {path} must be a table")
        built[name] = _section(cls, name, values, env)
    cfg = Config(**built)
    _validate(cfg)
    return cfg


def _validate(cfg: Config) -> None:
    if cfg.token.sessions < 1:
        raise ConfigError("token.sessions must be at least 1")
    if not 1 <= cfg.token.lanes <= cfg.token.sessions:
        raise ConfigError(
            f"token.lanes must be between 1 and token.sessions ({cfg.token.sessions}); "
            f"it is {cfg.token.lanes}"
        )
    if cfg.token.thread_safe not in ("auto", "true", "false"):
        raise ConfigError("token.thread_safe must be auto, true or false")
    if not cfg.token.uri.startswith("pkcs11:"):
        raise ConfigError("token.uri must be an RFC 7512 URI starting with 'pkcs11:'")
    for name, value in (
        ("token.health_interval_seconds", cfg.token.health_interval_seconds),
        ("token.reconnect_max_seconds", cfg.token.reconnect_max_seconds),
        ("token.stall_seconds", cfg.token.stall_seconds),
        ("token.max_failed_logins", cfg.token.max_failed_logins),
        ("keys.reaper_interval_seconds", cfg.keys.reaper_interval_seconds),
        ("server.grace_seconds", cfg.server.grace_seconds),
        ("server.refusal_window_seconds", cfg.server.refusal_window_seconds),
        ("server.idle_connection_seconds", cfg.server.idle_connection_seconds),
        ("server.max_connections_per_uid", cfg.server.max_connections_per_uid),
        ("server.max_connections", cfg.server.max_connections),
        ("server.max_calls_per_caller", cfg.server.max_calls_per_caller),
        ("server.max_calls_in_flight", cfg.server.max_calls_in_flight),
    ):
        if value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")
    if cfg.keys.import_token_lifetime_seconds <= 0:
        raise ConfigError(
            "keys.import_token_lifetime_seconds must be positive, "
            f"got {cfg.keys.import_token_lifetime_seconds}"
        )
    if cfg.keys.max_live_import_tokens < 1:
        raise ConfigError("keys.max_live_import_tokens must be at least 1")
    if cfg.keys.min_destruction_waiting_period_seconds < 0:
        raise ConfigError("keys.min_destruction_waiting_period_seconds must not be negative")
    if cfg.server.coredump_filter:
        try:
            int(cfg.server.coredump_filter, 16)
        except ValueError:
            raise ConfigError(
                "server.coredump_filter must be a hex bit mask such as 0x33"
            ) from None
    if not cfg.server.listen.startswith("unix:"):
        raise ConfigError(
            f"server.listen must be a Unix socket (unix:/path), got {cfg.server.listen!r}: "
            "the service does not listen on a network; remote callers use the TLS front"
        )
    for name in ("socket_mode", "front_socket_mode"):
        value = getattr(cfg.server, name)
        try:
            if not 0 <= int(value, 8) <= 0o777:
                raise ValueError
        except ValueError:
            raise ConfigError(
                f"server.{name} must be octal permissions such as 0660, got {value!r}"
            ) from None
    _validate_store(cfg.store.path)
    _validate_store(cfg.audit.path, "audit.path")
    database = "://" in cfg.audit.path
    if database and not (cfg.audit.public_key_file and cfg.audit.archive_dir):
        # Beside a file they default to PATH.key.pem and PATH.archive/; beside a URL there is
        # no such place, and the pin is the trust anchor outside the database.
        raise ConfigError(
            "audit.path is a database URL: audit.public_key_file and audit.archive_dir must be "
            "given (files, outside the database)"
        )
    if cfg.audit.chain and not database:
        raise ConfigError("audit.chain names a chain of a database: audit.path must be a URL")
    if cfg.audit.chain and not CHAIN_NAME.fullmatch(cfg.audit.chain):
        raise ConfigError(
            f"audit.chain must be 1 to 32 of a-z, 0-9 and '-', starting with a letter or digit, "
            f"got {shown(cfg.audit.chain)}"
        )
    if cfg.audit.checkpoint_every < 1 or cfg.audit.checkpoint_interval_seconds <= 0:
        raise ConfigError(
            "audit.checkpoint_every and audit.checkpoint_interval_seconds must be positive"
        )
    if cfg.audit.max_unsigned_records < 4 * cfg.server.max_calls_in_flight:
        raise ConfigError(
            f"audit.max_unsigned_records ({cfg.audit.max_unsigned_records}) must be at least "
            f"four times server.max_calls_in_flight ({cfg.server.max_calls_in_flight}): calls "
            "already running when the log stops taking new ones must fit under it"
        )
    if cfg.metrics.listen:
        parse_address(cfg.metrics.listen)
    if cfg.server.refused_calls_budget < 0:
        raise ConfigError("server.refused_calls_budget must not be negative (0 turns it off)")
    if cfg.server.max_message_bytes < 1:
        raise ConfigError("server.max_message_bytes must be positive")
    _validate_jwt(cfg.jwt)
    if (
        cfg.keys.destruction_waiting_period_seconds
        < cfg.keys.min_destruction_waiting_period_seconds
    ):
        raise ConfigError(
            "keys.destruction_waiting_period_seconds is shorter than "
            "keys.min_destruction_waiting_period_seconds"
        )


def _validate_jwt(jwt: JwtConfig) -> None:
    for name in (
        "publish_interval_seconds",
        "max_token_lifetime_seconds",
    ):
        if getattr(jwt, name) <= 0:
            raise ConfigError(f"jwt.{name} must be positive, got {getattr(jwt, name)}")
    for name in ("rotation_lead_seconds", "retired_grace_seconds"):
        if getattr(jwt, name) < 0:
            raise ConfigError(f"jwt.{name} must not be negative, got {getattr(jwt, name)}")
    if jwt.retired_grace_seconds < jwt.max_token_lifetime_seconds:
        raise ConfigError(
            f"jwt.retired_grace_seconds ({jwt.retired_grace_seconds:g}) is shorter than "
            f"jwt.max_token_lifetime_seconds ({jwt.max_token_lifetime_seconds:g}): a token "
            "signed just before a rotation would outlive its key's place in the JWKS"
        )
    scopes: set[str] = set()
    slugs: set[str] = set()
    for part in (p.strip() for p in jwt.issuers.split(",")):
        if not part:
            continue
        scope, eq, url = (x.strip() for x in part.partition("="))
        if not eq or not scope:
            raise ConfigError(
                f"jwt.issuers: each entry is SCOPE=https://HOST/NAME, got {shown(part)}"
            )
        m = ISSUER_URL.fullmatch(url)
        if m is not None and not _issuer_host_and_port(m):
            m = None
        if m is None:
            raise ConfigError(
                f"jwt.issuers: the issuer of scope {shown(scope)} must be https://HOST[:PORT]/NAME "
                f"(NAME: 1 to 63 of a-z, 0-9 and '-'; no query, no final slash), got {shown(url)}"
            )
        if not SCOPE_NAME.fullmatch(scope):
            raise ConfigError(f"jwt.issuers: {shown(scope)} is not a scope name")
        if scope in scopes:
            raise ConfigError(f"jwt.issuers binds scope {shown(scope)} to two issuers")
        if m.group(4) in slugs:
            raise ConfigError(
                f"jwt.issuers: two issuers end in /{m.group(4)}: each needs its own directory"
            )
        scopes.add(scope)
        slugs.add(m.group(4))


def _issuer_host_and_port(m: re.Match[str]) -> bool:
    if m.group(3) is not None and not 1 <= int(m.group(3)) <= 65535:
        return False
    if m.group(2) is not None:
        try:
            ipaddress.IPv6Address(m.group(2))
        except ValueError:
            return False
    return True


# libpq parameters a store URL must not carry: secrets (DESIGN.md 9: from owner-only files, never
# the configuration), and a service file, which can hold any of them out of the configuration's
# sight.
STORE_SECRET_PARAMETERS = ("password", "sslpassword")
STORE_REFUSED_PARAMETERS = (*STORE_SECRET_PARAMETERS, "service", "servicefile")
# A TCP connection must prove the server's identity: anything weaker (libpq's default "prefer"
# included) lets a network attacker downgrade it and rewrite rows in flight.
STORE_TLS_MODES = ("verify-full", "verify-ca")
# The schema of the service's tables, named in the URL (options=-csearch_path=NAME): an unquoted
# identifier, so that current_schema() returns it as written.
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_$]{0,62}")
_SEARCH_PATH = re.compile(r"^(?:-c|--)search_path=(.*)$")


def _validate_store(location: str, name: str = "store.path") -> None:
    """``store.path`` (or the CLI's ``--db``, ``name``): an SQLite file, or a PostgreSQL
    database as a libpq URL (issue 16). A URL carries no secret: the service reads them from
    owner-only files (DESIGN.md 9), here libpq's ``passfile``, never from the configuration or
    the environment. Messages name the parameter, never a secret's value (REVIEW.md 7)."""
    if "://" not in location:
        if "=" in location:
            # "host=db dbname=keys password=..." would otherwise be an SQLite file of that name.
            raise ConfigError(
                f"{name} looks like a libpq key=value string, which is taken for an SQLite file: "
                "give a PostgreSQL database as a postgresql:// URL"
            )
        return
    scheme = location.split("://", 1)[0]
    if f"{scheme}://" not in STORE_URL_SCHEMES:
        raise ConfigError(
            f"{name} must be a file or a postgresql:// URL, got a {shown(scheme)}:// URL"
        )
    params = store_parameters(location, name)
    if "password" in params:
        raise ConfigError(
            f"{name} must not carry the database's password: give it in an owner-only "
            "file with libpq's passfile=/path (or a client certificate)"
        )
    for refused in STORE_REFUSED_PARAMETERS:
        if refused in params:
            raise ConfigError(
                f"{name} must not carry {refused}=: the service takes every connection parameter "
                "from the URL, and secrets from owner-only files (passfile=, sslkey=)"
            )
    hosts = [h for h in params.get("host", "").split(",") if h]
    tcp = bool(params.get("hostaddr")) or any(not h.startswith(("/", "@")) for h in hosts)
    if tcp and params.get("sslmode") not in STORE_TLS_MODES:
        raise ConfigError(
            f"{name} names a host over TCP: it needs sslmode=verify-full (or verify-ca), lest a "
            "network attacker read or rewrite the key store's rows in flight"
        )
    if "passfile" in params:
        _check_passfile(params["passfile"], name)
    store_schema(params, name)


def store_parameters(location: str, name: str = "store.path") -> dict[str, str]:
    """The libpq parameters of a ``postgresql://`` URL, as libpq itself parses them."""
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        raise ConfigError(
            f"{name} is a PostgreSQL URL, and psycopg is not installed (the service extra)"
        ) from None
    try:
        parsed = conninfo_to_dict(location)
    except Exception:
        # libpq's message quotes the URL, password and all.
        raise ConfigError(f"{name} is not a valid PostgreSQL URL (libpq cannot parse it)") from None
    return {k: str(v) for k, v in parsed.items() if v is not None}


def store_schema(params: Mapping[str, str], name: str = "store.path") -> str:
    """The one schema a store URL names (``options=-csearch_path=NAME``): never the default
    ``"$user",public``, where a role that can create a schema named after the service's moves
    it onto fresh, empty tables (REVIEW.md 12)."""
    # libpq passes options to the server as words: "-c search_path=x" is two of them.
    words = re.sub(r"-c\s+", "-c", params.get("options", "")).split()
    found = [m.group(1) for word in words if (m := _SEARCH_PATH.match(word))]
    if len(found) != 1 or not _SCHEMA_NAME.fullmatch(found[0]):
        raise ConfigError(
            f"{name} must name the key store's schema, one lower-case unquoted identifier, as "
            "options=-csearch_path=NAME: the default search path lets a schema named after "
            "the role take the store's place"
        )
    return found[0]


def _check_passfile(path: str, name: str) -> None:
    """libpq ignores a passfile that group or others can read (a warning on stderr only), and
    the failure shows later as "no password supplied": refused here, at start, by name."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(
            f"{name}: passfile {shown(path)} cannot be read ({exc.strerror})"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{name}: passfile {shown(path)} is not a regular file")
    if st.st_uid != os.geteuid():
        raise ConfigError(f"{name}: passfile {shown(path)} is not owned by this service's user")
    if st.st_mode & 0o077:
        raise ConfigError(
            f"{name}: passfile {shown(path)} is open to group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}): make it owner-only (chmod 600)"
        )


def redacted(location: str) -> str:
    """``location`` as it may be shown (a message, a log line, the CLI's output): a URL without
    its password or any secret parameter, a libpq key=value string not at all."""
    if "://" not in location:
        return "(a libpq key=value string, not shown)" if "=" in location else location
    try:
        parts = urlsplit(location)
        netloc = parts.netloc
        if parts.password is not None:
            user, _, hosts = netloc.rpartition("@")
            netloc = f"{user.split(':', 1)[0]}:***@{hosts}"
        query = "&".join(
            f"{k}=***" if unquote(k) in STORE_SECRET_PARAMETERS else f"{k}={v}" if v else k
            for k, _, v in (pair.partition("=") for pair in parts.query.split("&") if pair)
        )
    except ValueError:
        return f"{location.split('://', 1)[0]}://(not shown: not a valid URL)"
    # Not urlunsplit: it drops the empty host of postgresql:///db (libpq's default socket).
    return (
        f"{parts.scheme}://{netloc}{parts.path}"
        + (f"?{query}" if query else "")
        + (f"#{parts.fragment}" if parts.fragment else "")
    )

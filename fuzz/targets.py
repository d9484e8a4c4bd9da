"""One function per parser that meets hostile input, each taking the fuzzer's bytes.

The invariant every target checks: the parser returns a correct result or raises our own clear
error (:class:`signer.errors.SignerError`, which the CLI turns into exit 2, or the one error a
function documents, such as :class:`signer.errors.TokenRejected`). Any other exception escaping a
target is a finding; so is an input that takes longer than the driver's ``-timeout`` or makes
the process's RSS pass ``-rss_limit_mb`` (``make fuzz`` sets both). Each target also checks what
"correct" means for its result (offsets inside the file, bounds kept, a refusal that names the
line).

Plain functions, importable without atheris: ``tests/unit/test_fuzz_regressions.py`` replays
``fuzz/corpus/<target>/`` and ``fuzz/crashes/<target>/`` through them in ``make test``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import tempfile
import tomllib
from collections.abc import Callable
from functools import cache
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from signer import jose
from signer._internal import config, policy
from signer.errors import ConfigError, CoreFormatError, SignerError, TokenRejected
from signer.scan import Scanner, ScanResult, load_public_keys, load_secrets, secret_from_key
from signer.scan import secret_from_pin as pin_secret
from signer.scan._elf import (
    MAX_FILE_ENTRIES,
    MAX_NOTES,
    MAX_PROBLEMS,
    parse_core,
    parse_maps,
)

# Fixed keys, so a seed that plants one stays meaningful across runs. Derived from constants:
# they are test material, never a real key.
EC_KEY = ec.derive_private_key(0x5EED_0F_F022 * 0x1_0000_0001 + 12345, ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
PIN = b"fuzz-pin-7f3a9c1e5b2d8f4a"
BLIND_BUDGET = 0.05
"""Seconds of blind work per input: enough to confirm a planted key, little enough that an
input full of decoys ends well inside the driver's timeout, as the budget promises."""
MAX_OUTPUT = 64 << 20
"""What a compressed input may decompress to here: a bomb among the inputs is refused after
64 MiB, in well under the driver's timeout."""


@cache
def _workdir() -> Path:
    # /dev/shm when there is one: a file per execution, thousands a second. Removed at exit;
    # libFuzzer ends without running atexit, so the campaign names the directory and removes it.
    given = os.environ.get("SIGNER_FUZZ_WORKDIR")
    if given:
        return Path(given)
    path = Path(tempfile.mkdtemp(prefix="signer-fuzz-", dir=scratch()))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def scratch() -> str | None:
    """Where the targets' files go: /dev/shm when there is one."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else None  # noqa: S108


def _file(data: bytes, name: str) -> Path:
    path = _workdir() / name
    path.write_bytes(data)
    return path


@cache
def known_scanner() -> Scanner:
    """Known-secret mode: an EC key, an Ed25519 key and a PIN (the seeds plant them)."""
    return Scanner(
        [secret_from_key(EC_KEY, "ec"), secret_from_key(ED_KEY, "ed"), pin_secret(PIN, "pin")]
    )


@cache
def compressed_scanner() -> Scanner:
    """The known-secret scanner's secrets, with the decompressed output bounded."""
    return Scanner(
        [secret_from_key(EC_KEY, "ec"), secret_from_key(ED_KEY, "ed"), pin_secret(PIN, "pin")],
        max_output=MAX_OUTPUT,
    )


@cache
def blind_scanner() -> Scanner:
    return Scanner(
        [],
        public_keys={"ec": EC_KEY.public_key(), "ed": ED_KEY.public_key()},
        blind_budget_seconds=BLIND_BUDGET,
    )


# --- targets --------------------------------------------------------------------------------


def elf(data: bytes) -> None:
    """signer.scan._elf.parse_core: a layout or CoreFormatError. A layout's memory lies inside
    the file, each byte once; what it holds is bounded whatever the headers claim."""
    try:
        layout = parse_core(data)
    except CoreFormatError:
        return
    if layout is None:
        return
    size = len(data)
    assert layout.memory_bytes <= size
    reach = 0
    for piece in layout.pieces:
        assert reach <= piece.offset
        assert piece.filesz > 0
        assert piece.offset + piece.filesz <= size
        reach = piece.offset + piece.filesz
        assert layout.address(piece.offset) == piece.vaddr
    for s in layout.segments:
        assert 0 <= s.filesz <= s.declared_filesz
    assert len(layout.notes) <= MAX_NOTES
    assert len(layout.files) <= MAX_FILE_ENTRIES
    assert len(layout.problems) <= MAX_PROBLEMS + 1
    for offset in (0, size // 2, size - 1):
        if layout.address(offset) is None:
            layout.outside_memory(offset)


def maps(data: bytes) -> None:
    """signer.scan._elf.parse_maps over any text: well-formed ranges only."""
    for m in parse_maps(data.decode("utf-8", "replace")):
        assert m.start >= 0
        assert m.name


def _check_result(result: ScanResult, size: int) -> None:
    assert result.size == size
    assert 0 <= result.bytes_scanned <= size
    for f in result.findings:
        assert f.offset >= 0, f
        assert f.length > 0, f
        assert f.offset + f.length <= size, f
        assert f.mapping is not None if result.is_core else f.address is None


def scan_known(data: bytes) -> None:
    """Scanner.scan in known-secret mode over any file: a result whose findings lie inside the
    file, or our error (ScanError)."""
    path = _file(data, "dump")
    try:
        result = known_scanner().scan(path)
    except SignerError:
        return
    _check_result(result, len(data))


def scan_compressed(data: bytes) -> None:
    """Scanner.scan of a compressed core (the seeds are the scan_known cores compressed with
    zstd, lz4 and xz; the fuzzer bends the compressed bytes): a result as for the file it
    decompresses to, within the output bound, or our error (ScanError: cut short, corrupt,
    too large)."""
    path = _file(data, "dump.compressed")
    try:
        result = compressed_scanner().scan(path)
    except SignerError:
        return
    assert result.size <= max(MAX_OUTPUT, len(data))
    _check_result(result, result.size)


def scan_blind(data: bytes) -> None:
    """Scanner.scan in blind mode (structural detectors, math checks): a result within the
    budget, or our error."""
    path = _file(data, "dump")
    try:
        result = blind_scanner().scan(path)
    except SignerError:
        return
    _check_result(result, len(data))
    assert result.blind is not None


def _toml_error_named(data: bytes, message: str) -> None:
    """When the file is not TOML at all, the refusal must name the line (issue 12)."""
    try:
        tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        assert "line" in message, message


def policy_file(data: bytes) -> None:
    """signer._internal.policy.load: a Policy, or a ConfigError (the service keeps its old policy)
    whose
    message names the line when the TOML itself is broken."""
    path = _file(data, "policy.toml")
    try:
        pol = policy.load(path)
    except ConfigError as exc:
        if len(data) <= config.MAX_TOML_BYTES:
            _toml_error_named(data, exc.message)
        return
    for g in pol.grants:
        assert g.callers
        assert g.operations <= policy.OPERATIONS
        assert g.scopes or g.keys
        pol.allows(policy.Caller.unix(1000, "user"), policy.Operation.SIGN, "k", "s")


def config_file(data: bytes) -> None:
    """signer._internal.config.load: a Config that dump() writes back as the same Config, or a
    ConfigError naming the line when the TOML itself is broken."""
    path = _file(data, "config.toml")
    try:
        cfg = config.load(path, env={})
    except ConfigError as exc:
        if len(data) <= config.MAX_TOML_BYTES:
            _toml_error_named(data, exc.message)
        return
    again = _file(config.dump(cfg).encode(), "again.toml")
    assert config.load(again, env={}) == cfg


def secrets_file(data: bytes) -> None:
    """signer.scan load_secrets (as a key file and as a *.pin file) and load_public_keys: what
    they load, or ScanError."""
    for name in ("secret.key", "secret.pin"):
        with contextlib.suppress(SignerError):
            load_secrets([_file(data, name)])
    with contextlib.suppress(SignerError):
        load_public_keys([_file(data, "public.pem")])


@cache
def _jwks() -> dict[str, object]:
    from jwt.algorithms import ECAlgorithm

    jwk = json.loads(ECAlgorithm.to_jwk(EC_KEY.public_key()))
    jwk.update(kid="k1", alg="ES256", scope="consumer", use="sig")
    return {"keys": [jwk]}


def jwt(data: bytes) -> None:
    """signer.jose: check_claims (the claims a caller sends SignJWT) gives a dict or
    InvalidArgument; verify_jwt of any token, against our JWKS or a JWKS from the input, gives
    claims or TokenRejected."""
    with contextlib.suppress(SignerError):
        assert isinstance(jose.check_claims(data), dict)
    token, _, jwks_text = data.partition(b"\n")
    jwks = _jwks()
    if jwks_text:
        try:
            parsed = json.loads(jwks_text)
        except (ValueError, RecursionError):
            parsed = None
        if isinstance(parsed, dict):
            jwks = parsed
    with contextlib.suppress(TokenRejected):
        jose.verify_jwt(token.decode("utf-8", "replace"), jwks, "consumer", "iss", "aud")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "elf": elf,
    "maps": maps,
    "scan_known": scan_known,
    "scan_compressed": scan_compressed,
    "scan_blind": scan_blind,
    "policy": policy_file,
    "config": config_file,
    "secrets": secrets_file,
    "jwt": jwt,
}

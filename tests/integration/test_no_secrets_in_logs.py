"""No secret reaches a log line or an error message, whatever the RPC and however it fails.

Every RPC is driven, succeeding and failing, against a real service whose log records are all
captured as the JSON lines it writes in production. All of that text, plus every error message
the client saw, is then searched with the dump scanner for the token PIN, the private keys the
test imported, their wrapped blobs and the signed payloads, in every representation. A positive
control plants the PIN in a copy of the same text and must be caught.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signer._internal.logs import JsonFormatter
from signer._wire import status_name
from signer.client import build_import_request
from signer.errors import SignerError
from signer.scan import Scanner, secret_from_key, secret_from_pin, secret_from_raw
from tests.conftest import log_lines

pytestmark = pytest.mark.integration


@pytest.fixture
def captured_logs() -> Any:
    """Every record any logger emits, formatted exactly as production formats it."""
    with log_lines("", JsonFormatter()) as lines:
        yield lines


def test_every_rpc_leaves_no_secret_in_logs_or_errors(
    service_factory: Callable[..., Any], token_host: Any, captured_logs: list[str], tmp_path: Path
) -> None:
    svc = service_factory(server={"max_message_bytes": 4096})
    c = svc.client()
    errors: list[str] = []

    def attempt(fn: Callable[[], object]) -> None:
        try:
            fn()
        except SignerError as exc:
            errors.append(f"{status_name(exc)}: {exc.message}")

    payloads = [os.urandom(48) for _ in range(6)]
    imported = ec.generate_private_key(ec.SECP256R1())
    imported_pem = imported.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    other = ec.generate_private_key(ec.SECP384R1())  # imported under the wrong algorithm
    other_pem = other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )

    # Successes.
    c.create_key("logs-ec", "ec-p256", scope="consumer", labels={"team": "a"})
    c.get_key("logs-ec")
    c.list_keys()
    c.public_key("logs-ec")
    c.public_key("logs-ec", format="jwk")
    sig = c.sign("logs-ec", message=payloads[0])
    c.verify("logs-ec", sig.signature, message=payloads[0])
    c.rotate("logs-ec")
    c.set_primary("logs-ec", 1)
    c.disable("logs-ec", 2)
    c.enable("logs-ec", 2)
    c.schedule_destruction("logs-ec", 2)
    c.cancel_destruction("logs-ec", 2)
    params = c.get_import_parameters()
    good = build_import_request("logs-byok", "ec-p256", imported_pem, params)
    c.import_key_version(good)
    c.sign("logs-byok", message=payloads[1])
    c.sign_batch("logs-ec", messages=[payloads[4], payloads[5]])
    c.sign_jwt("logs-ec", {"sub": payloads[4].hex(), "exp": 4102444800})
    c.jwks("consumer")
    params = c.get_import_parameters()  # the first was used up by the import

    # Failures of every kind.
    attempt(lambda: c.sign("logs-nope", message=payloads[2]))
    attempt(lambda: c.sign("logs-ec", message=payloads[3], version=99))
    attempt(lambda: c.sign("logs-ec", digest=payloads[3][:31]))
    attempt(lambda: c.sign("logs-ec", message=b""))
    attempt(lambda: c.sign("logs-ec", message=os.urandom(5000)))
    attempt(lambda: c.create_key("logs-ec", "ec-p256"))
    attempt(lambda: c.create_key("Bad Name", "ec-p256"))
    attempt(lambda: c.create_key("logs-ed", "ed25519"))
    attempt(lambda: c.verify("logs-ec", b"", message=payloads[0]))
    attempt(lambda: c.schedule_destruction("logs-ec", 1))
    attempt(lambda: c.list_keys(page_token="garbage!"))
    wrong_alg = build_import_request("logs-byok2", "ec-p256", other_pem, params)
    attempt(lambda: c.import_key_version(wrong_alg))
    corrupt = build_import_request("logs-byok3", "ec-p256", imported_pem, params)
    corrupt.wrapped_key = bytes(b ^ 0x5A for b in corrupt.wrapped_key)
    attempt(lambda: c.import_key_version(corrupt))
    unknown = build_import_request("logs-byok4", "ec-p256", imported_pem, params)
    unknown.import_token = "not-a-token"
    attempt(lambda: c.import_key_version(unknown))
    attempt(lambda: c.sign_batch("logs-nope", messages=[payloads[5]]))
    attempt(lambda: c.sign_jwt("logs-ec", payloads[5]))  # claims that are not JSON
    attempt(lambda: c.jwks("Bad Scope"))
    assert len(errors) == 17, errors

    svc.stop()  # shutdown logs too
    text = "\n".join(captured_logs) + "\n" + "\n".join(errors) + "\n"
    assert '"msg": "rpc failed"' in text  # the failures were logged, so the search means something
    out = tmp_path / "logs-and-errors.txt"
    out.write_text(text)

    secrets = [
        secret_from_pin(token_host.paths.user_pin.read_bytes().strip(), "pin"),
        secret_from_key(imported, "imported-key"),
        secret_from_key(other, "wrong-alg-key"),
        secret_from_raw(good.wrapped_key, "wrapped-blob"),
        secret_from_raw(wrong_alg.wrapped_key, "wrapped-blob-2"),
        *(secret_from_raw(p, f"payload-{i}") for i, p in enumerate(payloads)),
    ]
    scanner = Scanner(secrets)
    result = scanner.scan(out)
    assert result.findings == [], [(f.secret_id, f.representation) for f in result.findings]

    # Positive control: the same text with the PIN in it is caught.
    control = tmp_path / "control.txt"
    pin = token_host.paths.user_pin.read_text().strip()
    control.write_text(text + f'{{"msg": "login", "pin": "{pin}"}}\n')
    caught = scanner.scan(control)
    assert {f.secret_id for f in caught.findings} == {"pin"}

"""signer._internal.token.uri: RFC 7512 token URIs and object URIs."""

from __future__ import annotations

from urllib.parse import unquote

import pytest

from signer._internal.token.uri import TokenURI, object_uri
from signer.errors import ConfigError


def test_parse_single_attribute() -> None:
    assert TokenURI.parse("pkcs11:token=signer") == TokenURI(token="signer")


def test_parse_multiple_attributes_with_percent_encoding() -> None:
    uri = TokenURI.parse(
        "pkcs11:token=My%20Token%3B1;serial=0123%2F456;manufacturer=SoftHSM%20project;model=SoftHSM%20v2"
    )
    assert uri == TokenURI(
        token="My Token;1", serial="0123/456", manufacturer="SoftHSM project", model="SoftHSM v2"
    )


def test_parse_ignores_other_attributes_and_query() -> None:
    uri = TokenURI.parse(
        "pkcs11:library-description=x;slot-id=3;token=t;object=o;id=%01%02;type=private"
        "?pin-source=file:/etc/pin&module-name=softhsm2"
    )
    assert uri == TokenURI(token="t")


def test_parse_empty_path_matches_everything() -> None:
    uri = TokenURI.parse("pkcs11:")
    assert uri == TokenURI()
    assert uri.matches("any", "1", "m", "x")


def test_parse_tolerates_empty_segments() -> None:
    assert TokenURI.parse("pkcs11:;token=a;;serial=b;") == TokenURI(token="a", serial="b")


def test_parse_attribute_without_value() -> None:
    with pytest.raises(ConfigError, match="without a value"):
        TokenURI.parse("pkcs11:token")


@pytest.mark.parametrize(
    "bad", ["token=signer", "http://x", "PKCS11-token=x", "", " pkcs11:token=x"]
)
def test_parse_non_pkcs11_is_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="not a PKCS#11 URI"):
        TokenURI.parse(bad)


def test_matches() -> None:
    uri = TokenURI(token="signer", serial="42")
    assert uri.matches("signer", "42", "SoftHSM project", "SoftHSM v2")
    assert not uri.matches("signer", "43", "SoftHSM project", "SoftHSM v2")
    assert not uri.matches("other", "42", "SoftHSM project", "SoftHSM v2")
    by_model = TokenURI(manufacturer="Acme", model="HSM-1")
    assert by_model.matches("whatever", "1", "Acme", "HSM-1")
    assert not by_model.matches("whatever", "1", "Acme", "HSM-2")
    assert not by_model.matches("whatever", "1", "Acme Inc", "HSM-1")


@pytest.mark.parametrize(
    "uri",
    [
        TokenURI(token="signer"),
        TokenURI(token="a b;c=d/e%f?g", serial="12 34"),
        TokenURI(token="t", serial="s", manufacturer="m é", model="x&y"),
        TokenURI(model="only model"),
        TokenURI(),
    ],
)
def test_str_round_trip(uri: TokenURI) -> None:
    text = str(uri)
    assert text.startswith("pkcs11:")
    assert TokenURI.parse(text) == uri


def test_str_encodes_reserved_characters() -> None:
    assert str(TokenURI(token="a;b=c d")) == "pkcs11:token=a%3Bb%3Dc%20d"
    assert str(TokenURI(serial="1", token="t")) == "pkcs11:token=t;serial=1"


def test_object_uri_encodes_every_id_byte() -> None:
    key_id = bytes([0x00, 0x41, 0x7A, 0x2F, 0xFF, 0x25])  # includes unreserved 'A', 'z'
    uri = object_uri("signer", "payments/v1", key_id)
    assert uri == ("pkcs11:token=signer;object=payments%2Fv1;id=%00%41%7a%2f%ff%25;type=private")
    attrs = dict(part.split("=", 1) for part in uri[len("pkcs11:") :].split(";"))
    assert unquote(attrs["object"]) == "payments/v1"
    assert bytes.fromhex(attrs["id"].replace("%", "")) == key_id
    assert len(attrs["id"]) == 3 * len(key_id)


def test_object_uri_kind_and_label_encoding() -> None:
    uri = object_uri("my token", "a;b", b"\x01", kind="public")
    assert uri == "pkcs11:token=my%20token;object=a%3Bb;id=%01;type=public"
    assert TokenURI.parse(uri) == TokenURI(token="my token")

"""RFC 7512 PKCS#11 URIs: parse the ones that name a token, build the ones that name an object."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote

from signer.errors import ConfigError

_TOKEN_ATTRS = ("token", "serial", "manufacturer", "model")


@dataclass(frozen=True)
class TokenURI:
    token: str | None = None
    serial: str | None = None
    manufacturer: str | None = None
    model: str | None = None

    @classmethod
    def parse(cls, uri: str) -> TokenURI:
        if not uri.startswith("pkcs11:"):
            raise ConfigError(f"not a PKCS#11 URI: {uri!r}")
        path = uri[len("pkcs11:") :].split("?", 1)[0]
        values: dict[str, str] = {}
        for part in filter(None, path.split(";")):
            name, sep, value = part.partition("=")
            if not sep:
                raise ConfigError(f"PKCS#11 URI attribute without a value: {part!r}")
            if name in _TOKEN_ATTRS:
                values[name] = unquote(value)
            # Other path attributes (slot-*, library-*, object, id, type) do not select a token
            # for us; RFC 7512 says unknown ones are ignored, and these are simply not needed.
        return cls(**values)

    def matches(self, label: str, serial: str, manufacturer: str, model: str) -> bool:
        return all(
            want is None or want == have
            for want, have in (
                (self.token, label),
                (self.serial, serial),
                (self.manufacturer, manufacturer),
                (self.model, model),
            )
        )

    def __str__(self) -> str:
        parts = [
            f"{name}={quote(value, safe='')}"
            for name in _TOKEN_ATTRS
            if (value := getattr(self, name)) is not None
        ]
        return "pkcs11:" + ";".join(parts)


def object_uri(token_label: str, label: str, key_id: bytes, kind: str = "private") -> str:
    """The URI of one object; ``id`` is percent-encoded byte by byte, as RFC 7512 requires."""
    pct_id = "".join(f"%{b:02x}" for b in key_id)
    return (
        f"pkcs11:token={quote(token_label, safe='')};object={quote(label, safe='')};"
        f"id={pct_id};type={kind}"
    )

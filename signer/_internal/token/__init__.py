"""Everything that talks to PKCS#11 lives in this package, and nothing outside it imports pkcs11."""

from signer._internal.token._api import TokenAPI
from signer._internal.token._objects import TokenObject
from signer._internal.token._token import Token
from signer._internal.token.pin import Pin
from signer._internal.token.uri import TokenURI, object_uri

__all__ = ["Pin", "Token", "TokenAPI", "TokenObject", "TokenURI", "object_uri"]

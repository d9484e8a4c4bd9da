"""The service's inside: nothing here is API, and any of it may change without notice.

The public surface is :mod:`signer` (the client), :mod:`signer.errors`, :mod:`signer.keys`,
:mod:`signer.jose`, :mod:`signer.wrapping`, :mod:`signer.scan` and the generated :mod:`signer.v1`.
"""

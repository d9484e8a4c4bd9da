"""A signature in two PKCS#11 calls instead of python-pkcs11's three: :class:`DirectSign`.

python-pkcs11 0.10 signs with ``C_SignInit``, then ``C_Sign`` with no buffer to learn the
signature's length, then ``C_Sign`` again into a buffer of that length. Through
``p11-kit-client.so`` each call is a round trip to the token host, and each return waits for
the GIL. Giving ``C_Sign`` a buffer big enough for any signature the first time leaves two
(PKCS#11 allows it: the length is only asked for when the caller does not know it). Measured
here (issue 18, ec-p256, 64 callers, ``token.direct_sign`` off and on): 1,234 -> 1,356 sig/s,
token host 0.185 -> 0.165 CPU-ms per signature; raw, two threads: 8,216 -> 11,322 sig/s.

The calls must go to python-pkcs11's own module instance, since session and key handles are
only valid there, and ``p11-kit-client.so`` gives every ``C_GetFunctionList`` a new instance
(a new connection). python-pkcs11 keeps that instance's function list in a C field of its
objects that Python cannot read, so :meth:`DirectSign.of` reads it from the objects' memory,
only for the python-pkcs11 version whose layout is known, and believes it only if the session,
its token, its slot and the lib (each of python-pkcs11's exact type) hold the same list, the
list lies in readable memory with a 2.x or 3.x version, its three entries point into
executable memory, and a ``C_GetSessionInfo`` through it names the session's own slot and a
logged-in state. Anything else, and python-pkcs11
signs as before (the service logs which). Errors come back as python-pkcs11's exceptions, so
:mod:`._errors` translates them as ever.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
from dataclasses import dataclass
from typing import Any

import pkcs11.exceptions as p11e
from pkcs11 import KeyType
from pkcs11 import _pkcs11 as _p11

from signer._internal.token._mechanisms import MECHANISMS, PSS_PARAMS
from signer.keys import SignMechanism

_ULONG = ctypes.c_ulong

# python-pkcs11 versions whose objects start (after the object header) with the function list
# pointer: ``cdef class HasFuncList`` declares it first and has no C methods, so no vtable
# pointer comes before it (checked in 0.10.1's _pkcs11.pyx). Another version: python-pkcs11
# signs.
_LAYOUT_KNOWN = {"0.10.1"}

# Indexes in CK_FUNCTION_LIST, counting the version (padded to a pointer) as 0.
_GET_SESSION_INFO, _SIGN_INIT, _SIGN = 1 + 15, 1 + 42, 1 + 43

_CKR_OK = 0x0
_CKR_BUFFER_TOO_SMALL = 0x150
_CKS_RO_USER_FUNCTIONS, _CKS_RW_USER_FUNCTIONS = 1, 3
# Larger than any signature of the service's algorithms (RSA-4096: 512 bytes; P-521: 132). The
# RPC sends the length, not the buffer; a module that wants more says so and gets it, up to
# _MOST (a length past any signature is a broken module: its error, not an allocation).
_BUFFER = 1024
_MOST = 64 * 1024

# What C_SignInit and C_Sign may answer (PKCS#11 2.40), as python-pkcs11 raises them; any
# other code is a PKCS11Error naming it, as python-pkcs11's own table does.
_ERRORS: dict[int, type[p11e.PKCS11Error]] = {
    0x02: p11e.HostMemory,
    0x05: p11e.GeneralError,
    0x06: p11e.FunctionFailed,
    0x07: p11e.ArgumentsBad,
    0x20: p11e.DataInvalid,
    0x21: p11e.DataLenRange,
    0x30: p11e.DeviceError,
    0x31: p11e.DeviceMemory,
    0x32: p11e.DeviceRemoved,
    0x50: p11e.FunctionCancelled,
    0x54: p11e.FunctionNotSupported,
    0x60: p11e.KeyHandleInvalid,
    0x62: p11e.KeySizeRange,
    0x63: p11e.KeyTypeInconsistent,
    0x70: p11e.MechanismInvalid,
    0x71: p11e.MechanismParamInvalid,
    0x82: p11e.ObjectHandleInvalid,
    0x90: p11e.OperationActive,
    0x91: p11e.OperationNotInitialized,
    0xA3: p11e.PinExpired,
    0xB0: p11e.SessionClosed,
    0xB3: p11e.SessionHandleInvalid,
    0xE0: p11e.TokenNotPresent,
    0xE1: p11e.TokenNotRecognised,
    0x101: p11e.UserNotLoggedIn,
    0x200: p11e.FunctionRejected,
}


class _Mechanism(ctypes.Structure):
    _fields_ = (("mechanism", _ULONG), ("parameter", ctypes.c_void_p), ("length", _ULONG))


class _PssParams(ctypes.Structure):
    _fields_ = (("hash", _ULONG), ("mgf", _ULONG), ("salt", _ULONG))


class _SessionInfo(ctypes.Structure):
    _fields_ = (("slot", _ULONG), ("state", _ULONG), ("flags", _ULONG), ("device_error", _ULONG))


# CFUNCTYPE: ctypes lets the GIL go for the call, as python-pkcs11's ``with nogil`` does.
_SignInit = ctypes.CFUNCTYPE(_ULONG, _ULONG, ctypes.POINTER(_Mechanism), _ULONG)
_Sign = ctypes.CFUNCTYPE(
    _ULONG, _ULONG, ctypes.c_char_p, _ULONG, ctypes.c_char_p, ctypes.POINTER(_ULONG)
)
_GetSessionInfo = ctypes.CFUNCTYPE(_ULONG, _ULONG, ctypes.POINTER(_SessionInfo))

_PSS = _PssParams(*(int(p) for p in PSS_PARAMS))
# The mechanisms signed directly. EdDSA is left to python-pkcs11 (p11-kit 0.24 does not carry
# it, so it never reaches a token through the token host).
_MECHANISMS: dict[SignMechanism, _Mechanism] = {
    SignMechanism.ECDSA: _Mechanism(int(MECHANISMS[SignMechanism.ECDSA]), None, 0),
    SignMechanism.RSA_PKCS: _Mechanism(int(MECHANISMS[SignMechanism.RSA_PKCS]), None, 0),
    SignMechanism.RSA_PKCS_PSS: _Mechanism(
        int(MECHANISMS[SignMechanism.RSA_PKCS_PSS]),
        ctypes.cast(ctypes.pointer(_PSS), ctypes.c_void_p),
        ctypes.sizeof(_PSS),
    ),
}


def _error(rv: int) -> p11e.PKCS11Error:
    kind = _ERRORS.get(rv)
    return kind() if kind is not None else p11e.PKCS11Error(f"Unmapped error code {rv:#x}")


def _mapped(address: int, size: int, perms: str) -> bool:
    """Whether [address, address + size) lies in one mapping of this process that has every
    permission in ``perms`` ("r", "x"). Read as bytes: a mapped file's path may be any bytes."""
    with open("/proc/self/maps", "rb") as maps:
        for line in maps:
            span, have = line.split(maxsplit=2)[:2]
            low, high = (int(part, 16) for part in span.split(b"-"))
            if low <= address and address + size <= high:
                return all(p.encode() in have for p in perms)
    return False


def layout_known() -> bool:
    try:
        return importlib.metadata.version("python-pkcs11") in _LAYOUT_KNOWN
    except importlib.metadata.PackageNotFoundError:
        return False


def _entries(functions: int | None) -> tuple[int, int, int] | str:
    """C_GetSessionInfo, C_SignInit and C_Sign of the CK_FUNCTION_LIST at ``functions``, or why
    it is not believed to be one. Reads only readable memory; calls nothing."""
    pointer = ctypes.sizeof(ctypes.c_void_p)
    if not functions or not _mapped(functions, (_SIGN + 1) * pointer, "r"):
        return "no function list at the known place"
    version = (ctypes.c_ubyte * 2).from_address(functions)
    if version[0] not in (2, 3):
        return f"the function list's version is {version[0]}.{version[1]}, not 2.x or 3.x"
    table = (ctypes.c_void_p * (_SIGN + 1)).from_address(functions)
    get_info, sign_init, sign = table[_GET_SESSION_INFO], table[_SIGN_INIT], table[_SIGN]
    if get_info is None or sign_init is None or sign is None:
        return "the function list lacks C_GetSessionInfo, C_SignInit or C_Sign"
    # Nothing is called through the list before its three entries are shown to be code.
    if not all(_mapped(f, 1, "rx") for f in (get_info, sign_init, sign)):
        return "the function list's C_GetSessionInfo, C_SignInit or C_Sign is not code"
    return get_info, sign_init, sign


# The key type each mechanism signs with: anything else is left to python-pkcs11 (SoftHSM2
# 2.6.1's p11-kit-remote dies when an EC key is asked for RSA-PSS with an output buffer, where
# python-pkcs11's length query first fails cleanly).
_KEY_TYPES = {
    SignMechanism.ECDSA: KeyType.EC,
    SignMechanism.RSA_PKCS: KeyType.RSA,
    SignMechanism.RSA_PKCS_PSS: KeyType.RSA,
}


@dataclass(frozen=True)
class DirectSign:
    """Signs on the sessions of one module instance in two calls. Thread-safe as the pool
    makes it: a session is used by one thread at a time."""

    _sign_init: Any
    _sign: Any

    @classmethod
    def of(cls, session: Any, lib: Any) -> DirectSign | str:
        """A DirectSign for the module instance of ``lib`` (a python-pkcs11 ``lib``) and
        ``session`` (a logged-in Session of it), or why not: python-pkcs11 then signs. Never
        raises: a probe that cannot finish is a reason too."""
        try:
            return cls._probe(session, lib)
        except Exception as exc:
            return f"the probe could not finish ({type(exc).__name__})"

    @classmethod
    def _probe(cls, session: Any, lib: Any) -> DirectSign | str:
        if not layout_known():
            return "python-pkcs11's object layout is not known for this version"
        token = session.token
        holders = (session, token, token.slot, lib)
        # (by name: python-pkcs11's stub types _pkcs11.lib only)
        kinds = [getattr(_p11, name) for name in ("Session", "Token", "Slot", "lib")]
        if any(type(o) is not kind for o, kind in zip(holders, kinds, strict=True)):
            return "not python-pkcs11's own session, token, slot and lib"
        pointer = ctypes.sizeof(ctypes.c_void_p)
        # HasFuncList's first field follows the object header: every one of the four holds the
        # instance's list there, and all four must agree.
        offset = object.__basicsize__
        if any(type(o).__basicsize__ < offset + pointer for o in holders):
            return "python-pkcs11's objects are smaller than the known layout"
        lists = {ctypes.c_void_p.from_address(id(o) + offset).value for o in holders}
        if len(lists) != 1:
            return "python-pkcs11's objects do not agree on a function list"
        found = _entries(lists.pop())
        if isinstance(found, str):
            return found
        get_info, sign_init, sign = found
        info = _SessionInfo()
        rv = _GetSessionInfo(get_info)(session.handle, ctypes.byref(info))
        if rv != _CKR_OK:
            return f"C_GetSessionInfo through it answered {rv:#x}"
        if info.slot != token.slot.slot_id:
            return "C_GetSessionInfo through it named another slot"
        if info.state not in (_CKS_RO_USER_FUNCTIONS, _CKS_RW_USER_FUNCTIONS):
            return "C_GetSessionInfo through it showed no logged-in session"
        return cls(_SignInit(sign_init), _Sign(sign))

    @staticmethod
    def covers(mech: SignMechanism, key: Any) -> bool:
        """Whether ``key`` (python-pkcs11's, its type read once and cached by python-pkcs11,
        which reads it to sign too) signs with ``mech`` here."""
        return mech in _MECHANISMS and key.key_type is _KEY_TYPES[mech]

    def sign(self, key: Any, mech: SignMechanism, data: bytes | bytearray) -> bytes:
        """``key`` (a python-pkcs11 private key on a session of this instance) signs ``data``
        with ``mech``: C_SignInit, then C_Sign into a buffer large enough. Everything that can
        fail in Python is done before C_SignInit, so no failure here leaves an operation
        active on the session that python-pkcs11 would not have left too."""
        message = bytes(data)
        out = ctypes.create_string_buffer(_BUFFER)
        length = _ULONG(_BUFFER)
        mechanism = ctypes.byref(_MECHANISMS[mech])
        session = key.session.handle
        rv = self._sign_init(session, mechanism, key.handle)
        if rv != _CKR_OK:
            raise _error(rv)
        rv = self._sign(session, message, len(message), out, ctypes.byref(length))
        if rv == _CKR_BUFFER_TOO_SMALL and length.value <= _MOST:
            # The operation stays active: once more with the room the module asks for (as
            # python-pkcs11 does, once; a module that asks again gets the error, as there).
            out = ctypes.create_string_buffer(length.value)
            rv = self._sign(session, message, len(message), out, ctypes.byref(length))
        if rv != _CKR_OK:
            raise _error(rv)
        return out.raw[: length.value]

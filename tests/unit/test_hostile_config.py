"""Hostile configuration and policy files (issue 12).

A broken file is refused with a ConfigError naming the file and the line (TOML that does not
parse: where tomllib stopped; a value that parses but is wrong: the line of its table or
setting), never another exception. A running service's SIGHUP reload keeps the old policy,
which it does for a ConfigError and only for one: tests/unit/server/test_assembly.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz import targets
from signer._internal import config, policy
from signer.errors import ConfigError

GOOD = '[[grant]]\ncallers = ["uid:1000"]\noperations = ["sign"]\nscopes = ["consumer"]\n'


def write(tmp_path: Path, data: str | bytes, name: str = "file.toml") -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


BROKEN_POLICIES = [
    # (file, what the message must say)
    (GOOD + "\n[[grant]]\ncallers = [uid:1]\n", "(at line 7, column 12)"),
    (GOOD + '\n[[grant]]\ncallers = ["uid:1"\n', "(line 7, the last)"),
    (GOOD.encode() + b"\n# caf\xe9\n", "not UTF-8 text (byte 0xe9 at line 6, column 6)"),
    (GOOD + "x = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply (line 5)"),
    (GOOD + "\n\nx = 1" + "0" * 5000 + "\n", "Exceeds the limit (4300 digits)"),
    (GOOD + "\n\nx = 1" + "0" * 5000 + "\n", "(line 7)"),
    (
        GOOD + '\n[[grant]]\ncallers = ["uid:x"]\noperations = ["sign"]\nkeys = ["k"]\n',
        "grant #2 (line 6): 'uid:x' is not a numeric uid",
    ),
    (
        GOOD + '\n[[grant]]\ncallers = ["uid:\u0663"]\noperations = ["sign"]\nkeys = ["k"]\n',
        "grant #2 (line 6): 'uid:\u0663' is not a numeric uid",
    ),  # an Arabic-Indic 3
    (
        GOOD + '\n[[grant]]\ncallers = ["uid:1"]\noperations = ["fly"]\nkeys = ["k"]\n',
        "grant #2 (line 6): unknown operation(s) 'fly'",
    ),
    (
        GOOD + '\n[[revoked]]\nissuer = "CN=ca"\nserials = ["XYZ"]\n',
        "revoked #1 (line 6): serial 'XYZ' is not hexadecimal",
    ),
    (GOOD + "\n[grants]\n", "unknown table(s) 'grants' (line 6)"),
    ('grant = "all"\n', "'grant' must be an array of tables"),
]


@pytest.mark.parametrize(("text", "fragment"), BROKEN_POLICIES)
def test_broken_policy_is_refused_naming_the_line(
    tmp_path: Path, text: str | bytes, fragment: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        policy.load(path)
    assert fragment in ei.value.message
    assert str(path) in ei.value.message


def _fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo.toml"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda d: d, "cannot be read: Is a directory"),
        (_fifo, "is not a regular file"),  # opened without blocking: no writer needed
        (lambda d: write(d, "#" * (config.MAX_TOML_BYTES + 1)), "is larger than 1048576 bytes"),
        (lambda d: d / "missing.toml", "policy file not found"),
    ],
)
def test_files_that_are_not_policy_files(
    tmp_path: Path, make: Callable[[Path], Path], fragment: str
) -> None:
    path = make(tmp_path)
    began = time.monotonic()
    with pytest.raises(ConfigError, match=fragment):
        policy.load(path)
    assert time.monotonic() - began < 2


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "fragment"),
    [
        (
            "[server]\ngrace_seconds = " + "9" * 400 + "\n",
            "setting server.grace_seconds is out of range",
        ),
        ("[server]\n\ngrace_seconds = nan\n", "must be a finite number of seconds"),
        ("[server]\n\ngrace_seconds = inf\n", "/file.toml line 3)"),
        ("[server]\ngrace_seconds = -inf\n", "must be a finite number"),
        ("[server]\ngrace_seconds = 1e300\n", "at most 9223372036"),
        ("[token]\nsessions = 99999999999999999999\n", "token.sessions is out of range"),
        (
            "[token]\n\n\nlanes = 9\n",
            "token.lanes must be between 1 and token.sessions (8); it is 9 (",
        ),
        ("[token]\n\n\nlanes = 9\n", "file.toml line 4)"),
        ("[server]\nlisten = 'unix:/x'\nbogus = 1\n", "unknown setting(s) in [server]: 'bogus' "),
        ("[server]\nlisten = 'unix:/x'\nbogus = 1\n", "/file.toml line 3)"),
        ("[token]\n[tokens]\n", "unknown section(s)"),
        ("[token]\n[tokens]\n", "/file.toml line 2)"),
        ("[token]\nuri = 2024-01-01\n", "setting token.uri must be str"),
        ("a = " + "{b = " * 3000 + "1" + "}" * 3000 + "\n", "nested too deeply (line 1)"),
        (b'[token]\nuri = "\xff"\n', "not UTF-8 text (byte 0xff at line 2, column 8)"),
    ],
)
def test_broken_configuration_names_setting_and_line(
    tmp_path: Path, toml: str | bytes, fragment: str
) -> None:
    with pytest.raises(ConfigError) as ei:
        config.load(write(tmp_path, toml), env={})
    assert fragment in ei.value.message


def test_environment_overrides_are_checked_too_and_name_no_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\ngrace_seconds = 3\n")
    for value in ("nan", "inf", "1e999"):
        with pytest.raises(ConfigError) as ei:
            config.load(path, env={"SIGNER_SERVER_GRACE_SECONDS": value})
        assert "server.grace_seconds must be a finite number" in ei.value.message
        assert "line" not in ei.value.message  # the file's value is not the wrong one


# --- properties ------------------------------------------------------------------------------

_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=80) | st.sampled_from(
    ["uid:0", "user:x", "x509:CN=a", "*", "sign", "read", "consumer", "k-*"]
)
_SCALAR = st.one_of(
    st.integers(-(1 << 70), 1 << 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    _TEXT,
)
_VALUE = st.recursive(
    _SCALAR,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=12,
)


def _toml_value(v: object) -> str:
    import json
    import math

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(map(_toml_value, v)) + "]"
    assert isinstance(v, dict)
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"


@settings(max_examples=200, deadline=None)
@given(
    tables=st.lists(
        st.tuples(
            st.sampled_from(["[[grant]]", "[[revoked]]", "[grant]", "[other]"]),
            st.dictionaries(
                st.sampled_from(
                    [
                        "callers",
                        "operations",
                        "scopes",
                        "keys",
                        "issuers",
                        "issuer",
                        "serials",
                        "extra",
                    ]
                ),
                _VALUE,
                max_size=5,
            ),
        ),
        max_size=4,
    )
)
def test_any_policy_document_loads_or_is_refused(
    tables: list[tuple[str, dict[str, object]]],
) -> None:
    text = "".join(
        header + "\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in body.items())
        for header, body in tables
    )
    targets.policy_file(text.encode())


@settings(max_examples=200, deadline=None)
@given(
    sections=st.dictionaries(
        st.sampled_from(["server", "token", "store", "keys", "audit", "front", "nope"]),
        st.dictionaries(
            st.sampled_from(
                [
                    "listen",
                    "sessions",
                    "lanes",
                    "grace_seconds",
                    "uri",
                    "path",
                    "max_message_bytes",
                    "perturb_freed_memory",
                    "checkpoint_every",
                    "socket_mode",
                    "coredump_filter",
                    "unknown",
                ]
            ),
            _VALUE,
            max_size=4,
        ),
        max_size=4,
    )
)
def test_any_configuration_loads_or_is_refused(sections: dict[str, dict[str, object]]) -> None:
    """A Config (which dump() writes back as the same Config) or a ConfigError."""
    text = "".join(
        f"[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in body.items())
        for name, body in sections.items()
    )
    targets.config_file(text.encode())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_bytes_as_policy_or_configuration(data: bytes) -> None:
    targets.policy_file(data)
    targets.config_file(data)

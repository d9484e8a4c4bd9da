"""signer._internal.policy: the grammar of a policy file, and what a grant allows."""

from __future__ import annotations

from pathlib import Path

import pytest

from signer._internal import policy
from signer._internal.policy import Caller, Operation
from signer.errors import ConfigError

CONSUMER_APP = Caller.x509("O=acme,CN=consumer-app")
ALICE = Caller.unix(1000, "alice")
BOB = Caller.unix(1001, None)

TEXT = """
[[grant]]
callers = ["x509:O=acme,CN=consumer-app", "user:alice"]
operations = ["sign", "verify", "read"]
scopes = ["consumer"]

[[grant]]
callers = ["uid:1001"]
operations = ["sign"]
keys = ["release-*"]

[[grant]]
callers = ["uid:1001"]
operations = ["create", "read"]
scopes = ["builds"]
keys = ["ci-*"]

[[grant]]
callers = ["x509:CN=auditor"]
operations = ["read"]
scopes = ["*"]
"""


@pytest.fixture
def pol(tmp_path: Path) -> policy.Policy:
    path = tmp_path / "policy.toml"
    path.write_text(TEXT)
    return policy.load(path)


@pytest.mark.parametrize(
    ("caller", "op", "name", "scope", "allowed"),
    [
        (CONSUMER_APP, "sign", "tokens", "consumer", True),
        (CONSUMER_APP, "sign", "tokens", "enterprise", False),  # another scope
        (CONSUMER_APP, "rotate", "tokens", "consumer", False),  # an operation not granted
        (ALICE, "read", "tokens", "consumer", True),  # by user name
        (Caller.unix(1000, None), "read", "tokens", "consumer", False),  # uid 1000 alone: no
        (BOB, "sign", "release-2026", "anything", True),  # by key pattern, any scope
        (BOB, "sign", "nightly", "anything", False),
        (BOB, "read", "ci-7", "builds", True),  # scope and pattern both hold
        (BOB, "read", "ci-7", "other", False),  # pattern holds, scope does not
        (BOB, "read", "cd-7", "builds", False),  # scope holds, pattern does not
        (Caller.x509("CN=auditor"), "read", "anything", "whatever", True),
        (Caller.x509("CN=auditor"), "sign", "anything", "whatever", False),
        (Caller.x509("CN=stranger"), "read", "tokens", "consumer", False),  # default deny
    ],
)
def test_grants(
    pol: policy.Policy, caller: Caller, op: str, name: str, scope: str, allowed: bool
) -> None:
    assert pol.allows(caller, Operation(op), name, scope) is allowed


def test_a_key_that_does_not_exist_matches_only_grants_by_name_or_for_any_scope(
    pol: policy.Policy,
) -> None:
    sign, read = Operation.SIGN, Operation.READ
    assert not pol.allows(CONSUMER_APP, sign, "tokens", None)  # scope-bound: learns nothing
    assert pol.allows(BOB, sign, "release-9", None)  # named by pattern: may learn it is absent
    assert pol.allows(Caller.x509("CN=auditor"), read, "ghost", None)  # sees every scope


def test_new_keys_need_their_scope_granted_and_the_pattern_to_match(pol: policy.Policy) -> None:
    assert pol.allows_new(BOB, Operation.CREATE, "ci-8", "builds")
    assert not pol.allows_new(BOB, Operation.CREATE, "ci-8", "consumer")
    assert not pol.allows_new(BOB, Operation.CREATE, "cd-8", "builds")
    assert not pol.allows_new(CONSUMER_APP, Operation.CREATE, "x", "consumer")  # not granted create


def test_allows_any(pol: policy.Policy) -> None:
    assert pol.allows_any(BOB, Operation.CREATE)
    assert not pol.allows_any(CONSUMER_APP, Operation.IMPORT)


def test_star_means_every_operation(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[[grant]]\ncallers = ["uid:0"]\noperations = ["*"]\nscopes = ["*"]\n')
    pol = policy.load(path)
    root = Caller.unix(0, "root")
    assert all(pol.allows(root, op, "k", "s") for op in policy.OPERATIONS)


def test_star_makes_the_rest_of_the_list_moot(tmp_path: Path) -> None:
    """A list with '*' loaded whatever else it held before operations became a type (issue 13);
    it still does, and grants everything."""
    path = tmp_path / "p.toml"
    path.write_text('[[grant]]\ncallers = ["uid:0"]\noperations = ["*", "sgin"]\nscopes = ["*"]\n')
    pol = policy.load(path)
    assert pol.grants[0].operations == policy.OPERATIONS


def test_operations_are_the_names_policy_files_use(tmp_path: Path) -> None:
    """The file's names, unchanged by the enum (issue 13); a grant holds Operation members."""
    names = {"sign", "verify", "read", "create", "rotate", "import", "disable", "destroy"}
    assert {op.value for op in Operation} == names
    path = tmp_path / "p.toml"
    path.write_text(
        '[[grant]]\ncallers = ["uid:1"]\noperations = ["import", "rotate"]\nkeys = ["k"]\n'
    )
    (grant,) = policy.load(path).grants
    assert grant.operations == {Operation.IMPORT, Operation.ROTATE}
    assert all(type(op) is Operation for op in grant.operations)


def test_an_unknown_operation_names_its_grant_and_line(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        '[[grant]]\ncallers = ["uid:1"]\noperations = ["sign"]\nscopes = ["s"]\n\n'
        '[[grant]]\ncallers = ["uid:1"]\noperations = ["sign", "Sign"]\nscopes = ["s"]\n'
    )
    with pytest.raises(ConfigError, match=r"grant #2 \(line 6\): unknown operation\(s\) 'Sign'"):
        policy.load(path)


def test_no_policy_refuses_everything() -> None:
    assert not policy.DENY_ALL.allows(ALICE, Operation.READ, "k", "s")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[[grant]]\ncallers = ["alice"]\noperations = ["sign"]\nscopes = ["s"]',
            "must start with",
        ),
        ('[[grant]]\ncallers = ["uid:"]\noperations = ["sign"]\nscopes = ["s"]', "must start with"),
        ('[[grant]]\ncallers = ["uid:al"]\noperations = ["sign"]\nscopes = ["s"]', "not a numeric"),
        ('[[grant]]\ncallers = ["uid:1"]\noperations = ["sing"]\nscopes = ["s"]', "unknown operat"),
        ('[[grant]]\ncallers = ["uid:1"]\noperations = ["sign"]', "give scopes, keys or both"),
        ('[[grant]]\ncallers = []\noperations = ["sign"]\nscopes = ["s"]', "callers must be"),
        ('[[grant]]\ncallers = ["uid:1"]\noperations = ["sign"]\nscope = ["s"]', "unknown field"),
        ('[[grants]]\ncallers = ["uid:1"]', "unknown table"),
        ("[[grant]\n", "not valid TOML"),
    ],
)
def test_a_bad_policy_is_refused_naming_the_problem(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        policy.load(path)


def test_a_missing_policy_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="policy file not found"):
        policy.load(tmp_path / "nope.toml")


def test_grant_everything_writes_a_policy_that_loads(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(policy.grant_everything(["uid:1000", 'x509:O=a "b",CN=c']))
    pol = policy.load(path)
    assert pol.allows(ALICE, Operation.DESTROY, "any", "scope")
    assert pol.allows(Caller.x509('O=a "b",CN=c'), Operation.SIGN, "any", "scope")
    assert not pol.allows(BOB, Operation.READ, "any", "scope")


# --- certificates: issuer, serial, revocation (issue 11) ---------------------------------------

PINNED = """
[[grant]]
callers = ["x509:CN=payments"]
issuers = ["CN=ops CA"]
operations = ["sign"]
scopes = ["consumer"]

[[revoked]]
issuer = "CN=ops CA"
serials = ["00:1a:2B", "FF"]
"""


def test_a_grant_may_pin_the_issuers_of_its_certificates(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(PINNED)
    pol = policy.load(path)
    ops = Caller.x509("CN=payments", "CN=ops CA", "0A")
    partner = Caller.x509("CN=payments", "CN=partner CA", "0A")  # the same subject elsewhere
    assert pol.allows(ops, Operation.SIGN, "k", "consumer")
    assert not pol.allows(partner, Operation.SIGN, "k", "consumer")
    assert not pol.allows_new(partner, Operation.SIGN, "k", "consumer")
    # A certificate whose issuer the front did not give is not one the grant pinned.
    assert not pol.allows(Caller.x509("CN=payments"), Operation.SIGN, "k", "consumer")


def test_one_certificate_is_revoked_not_its_subject(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(PINNED)
    pol = policy.load(path)
    revoked = Caller.x509("CN=payments", "CN=ops CA", "1A2B")
    renewed = Caller.x509("CN=payments", "CN=ops CA", "1A2C")
    assert pol.revocation(revoked) == (
        "certificate 1A2B of CN=ops CA (x509:CN=payments) is revoked by the policy"
    )
    assert pol.revocation(renewed) is None
    assert pol.revocation(Caller.x509("CN=payments", "CN=partner CA", "1A2B")) is None
    assert pol.revocation(ALICE) is None


def test_a_certificate_is_known_by_issuer_and_serial() -> None:
    c = Caller.x509("CN=payments", "CN=ops CA", "00:0a:FF")
    assert (c.display, c.serial) == ("x509:CN=payments", "AFF")
    assert c.identity == "x509:CN=payments (issuer CN=ops CA, serial AFF)"
    assert ALICE.identity == "uid:1000(alice)"
    assert policy.serial_number("000") == "0"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[revoked]]\nissuer = "CN=ca"\n', "must be a table with issuer and serials"),
        ('[[revoked]]\nissuer = ""\nserials = ["01"]\n', "issuer must be a non-empty string"),
        ('[[revoked]]\nissuer = "CN=ca"\nserials = ["xyz"]\n', "serial 'xyz' is not hexadecimal"),
        ('[[revoked]]\nissuer = "CN=ca"\nserials = []\n', "non-empty list"),
        ('revoked = "all"\n', "'revoked' must be an array of tables"),
        (
            '[[grant]]\ncallers = ["uid:1"]\noperations = ["sign"]\nscopes = ["a"]\nissuers = []\n',
            "issuers must be a non-empty list",
        ),
    ],
)
def test_bad_revocations_and_issuers_are_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        policy.load(path)

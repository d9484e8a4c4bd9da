"""The package as a caller installs it: ``pip install signer`` is the client, and the service's and
the scanner's dependencies come with the extras ``signer[service]`` and ``signer[scan]``
(pyproject.toml). Each check runs in a fresh interpreter, where ``sys.modules`` shows what an
import really pulled in, and where the extras can be made absent."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import signer
from signer import client, errors, jose
from signer._wire import STATUS
from signer.cli.main import EXIT_ERROR, missing_extra

EXTRA_MODULES = (
    "pkcs11",
    "hyperscan",
    "numpy",
    "grpc_health",
    "grpc_reflection",
    "psycopg",
    "psycopg_pool",
)
# As if none of the extras were installed: an import of one of these raises ModuleNotFoundError.
WITHOUT_EXTRAS = f"import sys\nfor name in {EXTRA_MODULES!r}:\n    sys.modules[name] = None\n"
# The service's inside and the scanner: what only the commands that need them may import.
INSIDE = (
    "signer._internal.server",
    "signer._internal.keyring",
    "signer._internal.token",
    "signer.scan",
    "signer.harness",
)


def python(code: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60, check=False
    )


def loaded(prefixes: tuple[str, ...]) -> str:
    """Code that prints the modules under any of ``prefixes`` that are loaded (not the ones
    WITHOUT_EXTRAS made absent), one per line."""
    return (
        "print('\\n'.join(sorted(m for m, module in sys.modules.items() if module is not None "
        f"and any(m == p or m.startswith(p + '.') for p in {prefixes!r}))))\n"
    )


def test_the_public_surface_is_pinned() -> None:
    assert signer.__all__ == [
        "DEFAULT_ADDRESS",
        "AlreadyExists",
        "ClientTLS",
        "FailedPrecondition",
        "Internal",
        "InvalidArgument",
        "NotFound",
        "PermissionDenied",
        "ResourceExhausted",
        "Signature",
        "SignerClient",
        "SignerError",
        "TokenRejected",
        "Unauthenticated",
        "Unavailable",
        "__version__",
        "verify_jwt",
    ]
    for name in signer.__all__:
        assert hasattr(signer, name), name
    for name in ("DEFAULT_ADDRESS", "ClientTLS", "Signature", "SignerClient"):
        assert getattr(signer, name) is getattr(client, name)
    assert signer.verify_jwt is jose.verify_jwt
    assert signer.__version__ == importlib.metadata.version("signer")  # pyproject.toml's


def test_every_error_a_status_comes_back_as_is_exported() -> None:
    """What the client raises: the classes of the status table, their root, and the JWT
    verifier's TokenRejected; the local errors (ScanError, ConfigError, ...) stay in errors."""
    exported = {getattr(signer, n) for n in signer.__all__}
    exported_errors = {e for e in exported if isinstance(e, type) and issubclass(e, Exception)}
    assert exported_errors == set(STATUS) | {errors.SignerError, errors.TokenRejected}


def test_the_client_imports_neither_the_service_nor_the_scanner() -> None:
    code = "import sys\nimport signer, signer.client, signer.errors\n" + loaded(
        ("pkcs11", "hyperscan", "numpy", "signer._internal", "signer.scan", "signer.harness")
    )
    done = python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "\n"


def test_the_package_and_its_errors_load_no_grpc_until_the_client_is_used() -> None:
    """The keygen child, which holds the PIN, imports signer.errors: it loads neither gRPC nor
    the generated code; the client's names arrive on first use (PEP 562)."""
    code = "import sys\nimport signer, signer.errors, signer.keys\n" + loaded(
        ("grpc", "signer.v1", "signer.client", "jwt")
    )
    done = python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "\n"
    done = python("import signer\nprint(signer.SignerClient.__module__)")
    assert done.stdout == "signer.client\n", done.stderr
    assert "no attribute 'nothing'" in python("import signer\nsigner.nothing").stderr


def test_the_client_works_without_the_extras() -> None:
    code = WITHOUT_EXTRAS + textwrap.dedent(
        """
        import signer
        from signer.client import SignerClient
        from signer.errors import NotFound
        SignerClient("unix:/nonexistent/signer.sock").close()
        print(signer.__version__)
        """
    )
    done = python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "0.1.0\n"


def test_the_cli_parser_builds_without_the_extras_and_imports_nothing_of_them() -> None:
    code = (
        WITHOUT_EXTRAS
        + textwrap.dedent(
            """
        from signer.cli.main import build_parser
        parser = build_parser()
        for argv in (["keys", "list"], ["scan", "core", "--secrets", "key.pem"],
                     ["serve", "--config", "c.toml"], ["crash-test", "--report", "r"],
                     ["keys", "adopt", "k", "--algorithm", "ec-p256", "--id", "01",
                      "--config", "c.toml"]):
            assert parser.parse_args(argv).func
        """
        )
        + loaded(EXTRA_MODULES + INSIDE)
    )
    done = python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "\n"


def test_a_command_whose_extra_is_missing_says_which(tmp_path: Path) -> None:
    code = WITHOUT_EXTRAS + "from signer.cli.main import main\nsys.exit(main(sys.argv[1:]))\n"
    dump, key = tmp_path / "core", tmp_path / "key"
    dump.write_bytes(b"\0" * 64)
    key.write_bytes(b"a secret of some length")
    cases = [
        (["scan", str(dump), "--secrets", str(key)], "scan", "numpy|hyperscan"),
        (["serve", "--config", str(tmp_path / "c.toml")], "service", "grpc_health|pkcs11"),
        (
            ["keys", "adopt", "k", "--algorithm", "ec-p256", "--id", "01", "--config", "c.toml"],
            "service",
            "pkcs11",
        ),
    ]
    for argv, extra, modules in cases:
        done = python(code, *argv)
        assert done.returncode == EXIT_ERROR, (argv, done.stderr)
        assert re.fullmatch(
            rf"error: this command needs signer's '{extra}' extra, and ({modules})\S* is not "
            rf"installed: pip install 'signer\[{extra}\]'\n",
            done.stderr,
        ), (argv, done.stderr)


def test_a_missing_module_no_extra_brings_is_not_explained_away() -> None:
    assert missing_extra(ModuleNotFoundError("no yaml", name="yaml")) is None
    assert missing_extra(ModuleNotFoundError("no", name="pkcs11.exceptions")) == (
        "this command needs signer's 'service' extra, and pkcs11.exceptions is not installed: "
        "pip install 'signer[service]'"
    )

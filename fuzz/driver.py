"""One target under atheris: ``python -m fuzz.driver TARGET [libFuzzer options] [corpus dirs]``.

The signer's modules are instrumented for coverage (atheris sees Python branches; Hyperscan,
OpenSSL and numpy are native and count only through the Python around them). Any exception
escaping the target is a crash: libFuzzer writes the input to ``-artifact_prefix`` and stops.
``make fuzz`` (:mod:`fuzz.campaign`) runs every target this way.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    import atheris

    if len(sys.argv) < 2:
        sys.exit("usage: python -m fuzz.driver TARGET [libFuzzer options] [corpus dirs]")
    name = sys.argv.pop(1)
    # libFuzzer's -merge re-runs argv[0] with its own options: the campaign gives a wrapper
    # that runs this driver for this target.
    sys.argv[0] = os.environ.get("FUZZ_ARGV0", sys.argv[0])
    with atheris.instrument_imports(include=["signer", "fuzz"]):
        from fuzz import targets
    if name not in targets.TARGETS:
        sys.exit(f"unknown target {name!r}: one of {', '.join(targets.TARGETS)}")
    target = targets.TARGETS[name]
    # Compile scanners and make keys before the first input: a cold start is not a slow input.
    targets.known_scanner()
    targets.blind_scanner()
    targets._jwks()
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

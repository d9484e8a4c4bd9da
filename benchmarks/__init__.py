"""Benchmarks, each against baselines measured in the same run: ``make bench``.

Each scenario is a module with a ``run(ctx) -> ScenarioResult`` function registered in
:mod:`benchmarks.__main__`; the report (:mod:`benchmarks.report`) merges their raw numbers
into ``var/bench/latest.json`` (``ratios`` on top, ``scenarios`` below) and their tables into
``var/bench/latest.md``. Scenarios that need a real service core share one through
:class:`benchmarks.context.Context`.

* ``scan``: the dump scanner against ``grep -F`` and YARA on a real core of the service, same
  literal patterns for all three (:mod:`benchmarks.scan`).
* ``blind``: recall of blind mode for private keys planted in a copy of that core
  (:mod:`benchmarks.blind`).
* ``gate``: the dump gate end to end (stream in, scan, decide, release) per GiB of core, by
  detection mode, against ``cat`` to disk (:mod:`benchmarks.gate`).
* ``transport``: the mTLS front, the relay, authorisation and the audit log, each against the
  same service without it (:mod:`benchmarks.transport`).
* ``signing``: the service's throughput and latency (1, 16, 64 callers; ec-p256, rsa-2048,
  ed25519) against a software-key gRPC server and raw cryptography / SoftHSM2 / p11-kit
  baselines, with a chart (:mod:`benchmarks.signing`).
"""

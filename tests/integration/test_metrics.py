"""Metrics of the real service (``signer serve`` as its own process, ``[metrics] listen`` set)
on a real token host: scraped over HTTP, and by a real Prometheus (Debian's package) whose
query API must return what the service counted.

The token host here is the test's own (tests/integration/own_host.py): one test stops and
starts it, which the session's shared host must not see.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from signer.errors import FailedPrecondition, NotFound, Unavailable
from tests.conftest import (
    ServiceProcess,
    ServiceProcessFactory,
    TokenHostHandle,
    UniqueName,
    free_port,
    wait_until,
)
from tests.integration.own_host import own_host  # noqa: F401

pytestmark = pytest.mark.integration

PROMETHEUS = "/usr/bin/prometheus"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(address: str) -> Samples:
    """Every sample the listener serves: (name, labels) -> value."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def signer_series(samples: Samples) -> set[tuple[str, frozenset[tuple[str, str]]]]:
    return {key for key in samples if key[0].startswith("signer_")}


@pytest.fixture
def metered(
    own_host: TokenHostHandle,  # noqa: F811
    service_process_factory: ServiceProcessFactory,
) -> tuple[ServiceProcess, str]:
    """``signer serve`` on the test's own token host, its metrics on a port of its own."""
    address = f"127.0.0.1:{free_port()}"
    svc = service_process_factory(token=own_host.token_config(), metrics={"listen": address})
    return svc, address


def start_again(host: TokenHostHandle) -> None:
    """p11-kit server 0.24 has been seen to abort at start about once in fifty restarts
    (tests/integration/test_token_host_restart.py): started again, once, loudly."""
    try:
        host.start()
    except FailedPrecondition as exc:
        if "status -6" not in exc.message:
            raise
        print(f"p11-kit server aborted at start ({exc.message}); starting it again")
        host.start()


def test_scraped_calls_statuses_bounded_labels_and_a_token_host_restart(
    metered: tuple[ServiceProcess, str],
    own_host: TokenHostHandle,  # noqa: F811
    unique_name: UniqueName,
) -> None:
    svc, address = metered
    with svc.client() as c:
        names = [unique_name() for _ in range(50)]
        for name in names:
            c.create_key(name, "ec-p256")
        for _ in range(3):
            c.sign(names[0], message=b"counted")
        with pytest.raises(NotFound):
            c.sign(unique_name("missing"), message=b"a failing call")
        c.sign_batch(names[0], messages=[b"a", b"b", b"c", b"d"])
        before = scrape(address)
        calls = "signer_rpc_calls_total"
        assert value(before, calls, rpc="Sign", code="OK", caller="local") == 3
        assert value(before, calls, rpc="Sign", code="NOT_FOUND", caller="local") == 1
        assert value(before, calls, rpc="CreateKey", code="OK", caller="local") == 50
        assert value(before, calls, rpc="SignBatch", code="OK", caller="local") == 1
        assert value(before, "signer_sign_batch_items_total", code="OK") == 4
        assert value(before, "signer_sign_duration_seconds_count", rpc="Sign") == 4
        assert value(before, "signer_sign_duration_seconds_count", rpc="SignBatch") == 1
        assert value(before, "signer_token_up", connection="signing") == 1
        assert value(before, "signer_token_up", connection="admin") == 1
        assert value(before, "signer_token_logins_total", connection="signing", result="ok") == 1
        assert value(before, "signer_token_reconnects_total", connection="signing") == 0
        assert (value(before, "signer_audit_records_total") or 0) >= 55
        assert value(before, "signer_lanes_queued_jobs") == 0
        assert value(before, "process_resident_memory_bytes")

        # 49 more keys signed with: counts move, no series is added (no key name is a label).
        for name in names[1:]:
            c.sign(name, message=b"one each")
        after = scrape(address)
        assert signer_series(after) == signer_series(before)
        assert value(after, calls, rpc="Sign", code="OK", caller="local") == 3 + 49
        text = "\n".join(f"{n} {sorted(labels)}" for n, labels in after)
        assert not any(name in text for name in names)
        assert f"uid:{os.getuid()}" not in text

        # The token host goes away: the gauge drops, calls fail UNAVAILABLE (counted so); it
        # comes back: the gauge recovers and the reconnect is counted.
        own_host.stop()
        assert wait_until(
            lambda: value(scrape(address), "signer_token_up", connection="signing") == 0, 20
        ), "signer_token_up stayed 1 with the token host stopped"
        with pytest.raises(Unavailable):
            c.sign(names[0], message=b"while down")
        down = scrape(address)
        assert value(down, calls, rpc="Sign", code="UNAVAILABLE", caller="local") == 1
        start_again(own_host)
        assert wait_until(
            lambda: value(scrape(address), "signer_token_up", connection="signing") == 1, 30
        ), "signer_token_up did not come back to 1"
        back = scrape(address)
        assert value(back, "signer_token_reconnects_total", connection="signing") == 1
        assert value(back, "signer_token_logins_total", connection="signing", result="ok") == 2
        c.sign(names[0], message=b"after")


# --- a real Prometheus ---------------------------------------------------------------------


class Prometheus:
    """Debian's ``prometheus`` as a plain process, scraping ``target`` every second."""

    def __init__(self, target: str) -> None:
        if not Path(PROMETHEUS).exists():
            pytest.skip(f"{PROMETHEUS} not found: the Debian package prometheus (make deps)")
        self.dir = Path(tempfile.mkdtemp(prefix="signer-prometheus-"))
        self.address = f"127.0.0.1:{free_port()}"
        config = self.dir / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "scrape_configs:\n"
            "  - job_name: signer\n"
            "    static_configs:\n"
            f"      - targets: ['{target}']\n"
        )
        self.log = open(self.dir / "prometheus.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address={self.address}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        if not wait_until(lambda: self._ready() or self.proc.poll() is not None, 60):
            raise AssertionError(f"prometheus not ready:\n{self.output()}")
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.output()}")

    def output(self) -> str:
        return (self.dir / "prometheus.log").read_text(errors="replace")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.address}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """``/api/v1/query``: each series of an instant vector, with its value."""
        url = f"http://{self.address}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as r:
            answer = json.loads(r.read())
        assert answer["status"] == "success", answer
        return [(s["metric"], float(s["value"][1])) for s in answer["data"]["result"]]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def prometheus_for() -> Iterator[Callable[[str], Prometheus]]:
    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        p = Prometheus(target)
        started.append(p)
        return p

    yield start
    for p in started:
        with contextlib.suppress(Exception):
            p.stop()


def test_a_real_prometheus_scrapes_the_service(
    metered: tuple[ServiceProcess, str],
    prometheus_for: Callable[[str], Prometheus],
    unique_name: UniqueName,
) -> None:
    svc, address = metered
    prom = prometheus_for(address)
    with svc.client() as c:
        name = unique_name()
        c.create_key(name, "ec-p256")
        for _ in range(7):
            c.sign(name, message=b"scraped")
        with pytest.raises(NotFound):
            c.sign(unique_name("missing"), message=b"scraped")

    def scraped(promql: str, want: float) -> Callable[[], bool]:
        return lambda: [v for _, v in prom.query(promql)] == [want]

    signs = 'signer_rpc_calls_total{job="signer",rpc="Sign",code="OK",caller="local"}'
    assert wait_until(scraped(signs, 7), 30), (prom.query(signs), prom.output())
    failed = 'signer_rpc_calls_total{rpc="Sign",code="NOT_FOUND"}'
    assert wait_until(scraped(failed, 1), 10), prom.query(failed)
    assert prom.query('up{job="signer"}')[0][1] == 1
    assert prom.query('signer_token_up{connection="signing"}')[0][1] == 1
    # The histogram as Prometheus sees it: every Sign observed, the buckets cumulative.
    assert prom.query('signer_sign_duration_seconds_count{rpc="Sign"}')[0][1] == 8
    inf = prom.query('signer_sign_duration_seconds_bucket{rpc="Sign",le="+Inf"}')
    assert [v for _, v in inf] == [8]
    # Labels as the README says, and nothing else: no key name, no caller identity.
    labels = {k for metric, _ in prom.query("signer_rpc_calls_total") for k in metric}
    assert labels == {"__name__", "job", "instance", "rpc", "code", "caller"}

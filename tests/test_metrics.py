"""The Prometheus exporter of `mailtally run`: scraped over real HTTP, checked by promtool
and by a real Prometheus, compared with what the database holds."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import sqlite3
import ssl
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, self_signed
from daemonproc import SCENARIO, Running, append, daemon_config, wait_for, wait_read
from prometheus_client.parser import text_string_to_metric_families

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")


def scrape(
    url: str, headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None
) -> str:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        body: bytes = response.read()
        return body.decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


def store_sums(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        row = conn.execute(
            "SELECT sum(messages), sum(auth_rcv), sum(sent), sum(bounced), sum(deferred),"
            " sum(expired) FROM counters"
        ).fetchone()
    finally:
        conn.close()
    return dict(
        zip(("messages", "auth_rcv", "sent", "bounced", "deferred", "expired"), row, strict=True)
    )


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[Running, str, Path, Path]]:
    port = free_port()
    log, db = tmp_path / "mail.log", tmp_path / "run.db"
    cfg = daemon_config(
        tmp_path,
        db,
        [f"{{file: {log}}}"],
        extra=f'metrics: {{listen: "127.0.0.1:{port}"}}\nnotify: {{enabled: false}}\n',
    )
    append(log, SCENARIO)
    with Running(cfg, tmp_path) as daemon:
        daemon.wait_ready()
        wait_read(db, log)
        yield daemon, f"http://127.0.0.1:{port}/metrics", db, log
        if daemon.proc.poll() is None:
            daemon.stop()


def test_metrics_equal_the_store_and_pass_promtool(
    running: tuple[Running, str, Path, Path],
) -> None:
    _, url, db, log = running
    text = scrape(url)
    sums = store_sums(db)
    deliveries = {
        status: sum(
            v
            for (n, labels), v in samples(text).items()
            if n == "mailtally_deliveries_total" and ("status", status) in labels
        )
        for status in ("sent", "bounced", "deferred", "expired")
    }
    assert deliveries == {s: sums[s] for s in deliveries}
    assert value(text, "mailtally_messages_total") == sums["messages"]
    assert value(text, "mailtally_messages_auth_total") == sums["auth_rcv"]
    assert value(text, "mailtally_lines_read_total", source=str(log)) == len(SCENARIO)
    # The scenario's Postfix logged three SASL failures and three rejects (truth.json).
    assert value(text, "mailtally_sasl_failures_total") == 3
    assert sum(v for (n, _), v in samples(text).items() if n == "mailtally_rejects_total") == 3
    assert value(text, "mailtally_rejects_total", reason="relay_denied") == 2
    assert value(text, "mailtally_build_info", version="0.1.0", python=value_label(text))
    if PROMTOOL is not None:
        check = subprocess.run(
            [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, check=False
        )
        assert check.returncode == 0, check.stdout + check.stderr
        assert check.stdout + check.stderr == ""  # no warnings either


def value_label(text: str) -> str:
    for (name, labels), _ in samples(text).items():
        if name == "mailtally_build_info":
            return dict(labels)["python"]
    raise AssertionError("no build info")


def test_only_metrics_is_served(running: tuple[Running, str, Path, Path]) -> None:
    _, url, _, _ = running
    for path in ("/", "/metricsx", "/favicon.ico"):
        with pytest.raises(urllib.error.HTTPError) as exc:
            scrape(url.replace("/metrics", path))
        exc.value.close()
        assert exc.value.code == 404


def test_history_counters_survive_a_restart(tmp_path: Path) -> None:
    port = free_port()
    log, db = tmp_path / "mail.log", tmp_path / "run.db"
    cfg = daemon_config(
        tmp_path, db, [f"{{file: {log}}}"], extra=f'metrics: {{listen: "127.0.0.1:{port}"}}\n'
    )
    url = f"http://127.0.0.1:{port}/metrics"
    append(log, SCENARIO)
    with Running(cfg, tmp_path) as daemon:
        daemon.wait_ready()
        wait_read(db, log)
        before = scrape(url)
        daemon.stop()
    with Running(cfg, tmp_path) as daemon:
        daemon.wait_ready()
        after = scrape(url)
        daemon.stop()
    for name in ("mailtally_messages_total", "mailtally_sasl_failures_total"):
        assert value(after, name) == value(before, name) > 0
    assert value(after, "mailtally_deliveries_total", status="sent", transport="smtp") == value(
        before, "mailtally_deliveries_total", status="sent", transport="smtp"
    )
    # Reading starts over with the process: nothing new was read after the restart.
    assert value(before, "mailtally_lines_read_total", source=str(log)) == len(SCENARIO)
    assert value(after, "mailtally_lines_read_total", source=str(log)) == 0


def test_tls_and_basic_auth(tmp_path: Path) -> None:
    key, cert = self_signed(tmp_path)
    secret = tmp_path / "scrape-password"
    secret.write_text("hunter2\n")
    port = free_port()
    log, db = tmp_path / "mail.log", tmp_path / "run.db"
    extra = (
        f'metrics: {{listen: "127.0.0.1:{port}", tls_cert: {cert}, tls_key: {key},'
        f" basic_auth_username: prometheus, basic_auth_password_file: {secret}}}\n"
    )
    cfg = daemon_config(tmp_path, db, [f"{{file: {log}}}"], extra=extra)
    context = ssl.create_default_context(cafile=str(cert))
    url = f"https://127.0.0.1:{port}/metrics"
    good = {"Authorization": "Basic " + base64.b64encode(b"prometheus:hunter2").decode()}
    bad = {"Authorization": "Basic " + base64.b64encode(b"prometheus:guess").decode()}
    with Running(cfg, tmp_path) as daemon:
        daemon.wait_ready()
        assert "mailtally_build_info" in scrape(url, good, context)
        for headers in (bad, {}):
            with pytest.raises(urllib.error.HTTPError) as exc:
                scrape(url, headers, context)
            exc.value.close()
            assert exc.value.code == 401
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            scrape(url.replace("https:", "http:"), good)  # no plain HTTP
        daemon.stop()


def test_opt_in_top_senders_is_bounded(tmp_path: Path) -> None:
    port = free_port()
    log, db = tmp_path / "mail.log", tmp_path / "run.db"
    cfg = daemon_config(
        tmp_path,
        db,
        [f"{{file: {log}}}"],
        extra=f'metrics: {{listen: "127.0.0.1:{port}", top_senders: 2}}\n',
    )
    append(log, SCENARIO)
    with Running(cfg, tmp_path) as daemon:
        daemon.wait_ready()
        wait_read(db, log)
        text = scrape(f"http://127.0.0.1:{port}/metrics")
        daemon.stop()
    top = {
        dict(labels)["sender"]: v
        for (name, labels), v in samples(text).items()
        if name == "mailtally_top_sender_messages"
    }
    assert top == {"heavy@campus.example": 230, "alice@campus.example": 7}
    off = daemon_config(
        tmp_path, db, ["{file: /x}"], extra="metrics: {top_senders: 51}\n", name="o.yaml"
    )
    from conftest import run_cli

    proc = run_cli("check-config", off, check=False)
    assert proc.returncode == 2
    assert "metrics.top_senders" in proc.stderr


@pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus package is not installed")
def test_a_real_prometheus_scrapes_it(tmp_path: Path) -> None:
    port, prom_port = free_port(), free_port()
    log, db = tmp_path / "mail.log", tmp_path / "run.db"
    cfg = daemon_config(
        tmp_path, db, [f"{{file: {log}}}"], extra=f'metrics: {{listen: "127.0.0.1:{port}"}}\n'
    )
    prom_cfg = tmp_path / "prometheus.yml"
    prom_cfg.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: mailtally\n    static_configs: [{{targets: ['127.0.0.1:{port}']}}]\n"
    )
    append(log, SCENARIO[:700])
    with Running(cfg, tmp_path) as daemon:
        daemon.wait_ready()
        prometheus = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={prom_cfg}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            append(log, SCENARIO[700:])
            wait_read(db, log)
            sums = store_sums(db)
            api = f"http://127.0.0.1:{prom_port}/api/v1/query?query="

            def query(expr: str) -> float | None:
                try:
                    answer = json.loads(scrape(api + urllib.parse.quote(expr)))
                except (urllib.error.URLError, ConnectionError):
                    return None
                result = answer["data"]["result"]
                return float(result[0]["value"][1]) if result else None

            for status in ("bounced", "sent", "deferred"):
                expr = f'sum(mailtally_deliveries_total{{status="{status}"}})'
                wait_for(lambda e=expr, s=status: query(e) == sums[s], 60, f"Prometheus: {expr}")
            assert query("sum(mailtally_messages_total)") == sums["messages"]
            assert query('up{job="mailtally"}') == 1
        finally:
            prometheus.terminate()
            prometheus.wait(timeout=30)
        daemon.stop()


def test_a_taken_metrics_port_does_not_stop_counting(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        log, db = tmp_path / "mail.log", tmp_path / "run.db"
        cfg = daemon_config(
            tmp_path, db, [f"{{file: {log}}}"], extra=f'metrics: {{listen: "127.0.0.1:{port}"}}\n'
        )
        append(log, SCENARIO)
        with Running(cfg, tmp_path) as daemon:
            daemon.wait_ready()
            wait_read(db, log)
            daemon.stop()
            assert "metrics not served, counting goes on" in daemon.log()
    assert store_sums(db)["messages"] == 254

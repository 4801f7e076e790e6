"""The policy server of `mailtally run`, spoken to over real sockets as Postfix does."""

from __future__ import annotations

import resource
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, run_cli, stamp
from daemonproc import Running, append, wait_for

LIMIT = 5
ACTION = "DEFER_IF_PERMIT 4.7.1 Daily limit reached"


def request(**attrs: str) -> bytes:
    base = {
        "request": "smtpd_access_policy",
        "protocol_state": "END-OF-MESSAGE",
        "protocol_name": "ESMTP",
        "client_address": "192.0.2.10",
        "client_name": "web.campus.example",
        "recipient_count": "1",
        "size": "1024",
    }
    base.update(attrs)
    return "".join(f"{k}={v}\n" for k, v in base.items()).encode() + b"\n"


OPEN: list[socket.socket] = []  # closed after each test


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while OPEN:
        OPEN.pop().close()


class Client:
    """One persistent connection, like one smtpd process's."""

    def __init__(self, address: tuple[str, int] | str) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        OPEN.append(self.sock)
        self.sock.settimeout(10)
        self.sock.connect(address)
        self.buffer = b""

    def ask(self, data: bytes, pieces: int = 1) -> str:
        step = max(1, len(data) // pieces)
        for i in range(0, len(data), step):
            self.sock.sendall(data[i : i + step])
            if pieces > 1:
                time.sleep(0.001)
        return self.answer()

    def answer(self) -> str:
        while b"\n\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed without an answer")
            self.buffer += chunk
        reply, _, self.buffer = self.buffer.partition(b"\n\n")
        text = reply.decode()
        assert text.startswith("action="), text
        assert "\n" not in text
        return text.removeprefix("action=")

    def closed_without_answer(self) -> bool:
        try:
            return self.sock.recv(4096) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


NO_METRICS = "metrics: {enabled: false}\n"


def policy_config(tmp: Path, port: int, extra: str = "", policy: str = "") -> Path:
    log, db = tmp / "mail.log", tmp / "run.db"
    log.touch()
    cfg = tmp / "run.yaml"
    cfg.write_text(
        f"timezone: UTC\ndatabase: {db}\nsources: [{{file: {log}}}]\n"
        "notify: {enabled: false}\n"
        f"thresholds:\n  default: {{warn: {LIMIT}}}\n"
        "  domains: {big.example: {warn: 50}}\n"
        "  senders: {lists@campus.example: {exempt: true}}\n"
        f"{extra or NO_METRICS}"
        "policy:\n"
        f'  listen: ["127.0.0.1:{port}", "unix:{tmp}/policy.sock"]\n'
        f'  actions: {{warn: "{ACTION}"}}\n'
        f"{policy}",
        encoding="utf-8",
    )
    return cfg


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Running, tuple[str, int], Path]]:
    port = free_port()
    cfg = policy_config(tmp_path, port, extra=f'metrics: {{listen: "127.0.0.1:{free_port()}"}}\n')
    with Running(cfg, tmp_path) as daemon:
        daemon.wait_ready()
        yield daemon, ("127.0.0.1", port), tmp_path
        if daemon.proc.poll() is None:
            daemon.stop()


def counts(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT identity, messages FROM policy_counts").fetchall())
    finally:
        conn.close()


def test_limit_then_action_other_senders_unaffected(server: tuple) -> None:  # type: ignore[type-arg]
    _, address, tmp = server
    client = Client(address)
    answers = [client.ask(request(sender="A@Campus.example", instance=f"a{i}")) for i in range(7)]
    assert answers == ["DUNNO"] * LIMIT + [ACTION, ACTION]
    other = Client(str(tmp / "policy.sock"))  # the UNIX listener shares the counts
    assert other.ask(request(sender="b@campus.example", instance="b1")) == "DUNNO"
    assert other.ask(request(sender="a@campus.example", instance="a9")) == ACTION
    assert counts(tmp / "run.db") == {"a@campus.example": LIMIT, "b@campus.example": 1}
    conn = sqlite3.connect(tmp / "run.db")
    blocks = conn.execute("SELECT identity, level, action, count FROM policy_blocks").fetchall()
    conn.close()
    assert blocks == [("a@campus.example", "warn", ACTION, LIMIT)] * 3


def test_protocol_details(server: tuple) -> None:  # type: ignore[type-arg]
    _, address, tmp = server
    client = Client(address)
    # Split across many reads; an unknown attribute; "=" inside a value; empty values.
    data = request(
        sender="c@campus.example",
        instance="c1",
        future_attribute_of_postfix_4="x=y=z",
        sasl_username="",
        recipient="",
    )
    assert client.ask(data, pieces=len(data)) == "DUNNO"
    # Many requests on one connection, back to back in one write.
    burst = b"".join(request(sender="c@campus.example", instance=f"c{i}") for i in range(2, 5))
    client.sock.sendall(burst)
    assert [client.answer() for _ in range(3)] == ["DUNNO"] * 3
    # RCPT requests are decided but not counted; a repeated instance counts once.
    rcpt = request(sender="c@campus.example", protocol_state="RCPT", instance="c5")
    assert client.ask(rcpt) == "DUNNO"
    assert client.ask(request(sender="c@campus.example", instance="c4")) == "DUNNO"
    assert counts(tmp / "run.db")["c@campus.example"] == 4
    # The null sender and exempt senders are never limited.
    for _ in range(LIMIT + 2):
        assert client.ask(request(sender="", instance=f"n{time.monotonic_ns()}")) == "DUNNO"
        lists = request(sender="lists@campus.example", instance=f"l{time.monotonic_ns()}")
        assert client.ask(lists) == "DUNNO"
    # A per-domain override.
    for i in range(LIMIT + 2):
        assert client.ask(request(sender="x@big.example", instance=f"x{i}")) == "DUNNO"


@pytest.mark.parametrize(
    "bad",
    [
        b"request=smtpd_access_policy\nsender=" + b"a" * 20_000 + b"\n\n",
        b"request=smtpd_access_policy\n" + b"".join(b"x%d=1\n" % i for i in range(300)) + b"\n",
        b"protocol_state=RCPT\nsender=a@b.example\n\n",
        b"request=something_else\n\n",
        b"request=smtpd_access_policy\nno equals sign\n\n",
    ],
    ids=["oversized-line", "too-many-attributes", "no-request", "other-request", "no-equals"],
)
def test_malformed_requests_close_without_answer(server: tuple, bad: bytes) -> None:  # type: ignore[type-arg]
    daemon, address, _ = server
    client = Client(address)
    client.sock.sendall(bad)
    assert client.closed_without_answer()
    wait_for(lambda: "policy request malformed" in daemon.log(), 10, "the log line")
    assert Client(address).ask(request(sender="d@campus.example", instance="d1")) == "DUNNO"


def test_disconnect_mid_request_and_many_idle_connections(server: tuple) -> None:  # type: ignore[type-arg]
    daemon, address, _ = server
    half = Client(address)
    half.sock.sendall(b"request=smtpd_access_policy\nsender=e@campus.ex")
    half.close()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    idle = []
    try:
        for _ in range(1000):
            idle.append(Client(address))
        client = Client(address)
        assert client.ask(request(sender="e@campus.example", instance="e1")) == "DUNNO"
        # Every idle connection still works.
        assert idle[0].ask(request(sender="e@campus.example", instance="e2")) == "DUNNO"
        assert idle[-1].ask(request(sender="e@campus.example", instance="e3")) == "DUNNO"
    finally:
        for c in idle:
            c.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert daemon.proc.poll() is None


def test_concurrent_smtpd_processes_get_a_consistent_count(server: tuple) -> None:  # type: ignore[type-arg]
    _, address, tmp = server
    results: list[str] = []
    lock = threading.Lock()

    def smtpd(n: int) -> None:
        client = Client(address)
        for i in range(10):
            answer = client.ask(request(sender="f@big.example", instance=f"f{n}.{i}"))
            with lock:
                results.append(answer)

    threads = [threading.Thread(target=smtpd, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 200
    assert results.count("DUNNO") == 50  # big.example's limit, exactly
    assert counts(tmp / "run.db")["f@big.example"] == 50


def test_counts_include_the_log_and_survive_kill_9(tmp_path: Path) -> None:
    port = free_port()
    cfg = policy_config(tmp_path, port)
    now = stamp(__import__("datetime").datetime.now(__import__("datetime").UTC), "rfc3339")
    lines = []
    for i in range(2):  # two messages the log already has
        qid = f"AB{i:04X}"
        lines += [
            f"{now} relay1 postfix/smtpd[1]: {qid}: client=web[10.0.0.5]",
            f"{now} relay1 postfix/qmgr[2]: {qid}: from=<g@campus.example>, size=1, nrcpt=1"
            " (queue active)",
        ]
    append(tmp_path / "mail.log", lines)
    with Running(cfg, tmp_path) as daemon:
        daemon.wait_ready()
        wait_for(lambda: _logged(tmp_path / "run.db") == 2, 20, "the log counted")
        client = Client(("127.0.0.1", port))
        first = [
            client.ask(request(sender="g@campus.example", instance=f"g{i}")) for i in range(2)
        ]
        assert first == ["DUNNO", "DUNNO"]  # max(log 2, own 2) + 1 = 3 of 5
        daemon.kill(whole_group=True)  # answered means committed
    assert counts(tmp_path / "run.db") == {"g@campus.example": 2}
    with Running(cfg, tmp_path) as daemon:
        daemon.wait_ready()
        client = Client(("127.0.0.1", port))
        after = [
            client.ask(request(sender="g@campus.example", instance=f"h{i}")) for i in range(5)
        ]
        daemon.stop()
    assert after == ["DUNNO"] * 3 + [ACTION, ACTION]


def _logged(db: Path) -> int:
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT sum(messages) FROM counters").fetchone()
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()
    return int(row[0] or 0)


@pytest.mark.parametrize("fail_action", ["DUNNO", "DEFER_IF_PERMIT 4.3.0 try again later"])
def test_a_locked_database_fails_open_within_the_budget(tmp_path: Path, fail_action: str) -> None:
    port = free_port()
    cfg = policy_config(
        tmp_path, port, policy=f'  fail_action: "{fail_action}"\n  budget: 400ms\n'
    )
    with Running(cfg, tmp_path) as daemon:
        daemon.wait_ready()
        client = Client(("127.0.0.1", port))
        assert client.ask(request(sender="h@campus.example", instance="h0")) == "DUNNO"
        admin = sqlite3.connect(tmp_path / "run.db", isolation_level=None)
        admin.execute("BEGIN EXCLUSIVE")
        try:
            started = time.monotonic()
            answer = client.ask(request(sender="h@campus.example", instance="h1"))
            took = time.monotonic() - started
        finally:
            admin.execute("ROLLBACK")
            admin.close()
        assert answer == fail_action
        assert took < 5  # far below smtpd_policy_service_timeout (100 s)
        assert client.ask(request(sender="h@campus.example", instance="h2")) == "DUNNO"
        daemon.stop()
        assert "policy answered" in daemon.log()
    # The count decided under the lock was kept and committed afterwards.
    assert counts(tmp_path / "run.db") == {"h@campus.example": 3}


def test_policy_metrics(server: tuple) -> None:  # type: ignore[type-arg]
    _, address, tmp = server
    client = Client(address)
    for i in range(LIMIT + 1):
        client.ask(request(sender="m@campus.example", instance=f"m{i}"))
    text = (tmp / "run.yaml").read_text()
    port = int(text.split('metrics: {listen: "127.0.0.1:')[1].split('"')[0])
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        body = r.read().decode()
    assert 'mailtally_policy_requests_total{action="DUNNO"} ' in body
    assert 'mailtally_policy_requests_total{action="DEFER_IF_PERMIT"} 1.0' in body
    assert "mailtally_policy_decision_seconds_count" in body


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ('policy: {listen: ["127.0.0.1:10040"]}\n', "policy.actions: empty while policy.listen"),
        (
            'policy: {listen: ["127.0.0.1:10040"], actions: {block: REJECT}}\n',
            "policy.actions.block: no thresholds rule has a level 'block' (levels: warn)",
        ),
        (
            'policy: {listen: ["127.0.0.1:10040"], actions: {warn: "ACCEPT please"}}\n',
            "policy.actions.warn: expected a policy action",
        ),
        ('policy: {listen: ["nowhere"], actions: {warn: DUNNO}}\n', "policy.listen: expected"),
        ("policy: {fail_action: REJECT}\n", "policy.fail_action: expected DUNNO or DEFER_IF"),
    ],
)
def test_config_safety(tmp_path: Path, policy: str, message: str) -> None:
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"thresholds: {{default: {{warn: 200}}}}\n{policy}", encoding="utf-8")
    proc = run_cli("check-config", cfg, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr


def test_check_config_shows_the_action_for_a_sender(tmp_path: Path) -> None:
    cfg = policy_config(tmp_path, 10040)
    out = run_cli("check-config", cfg, "--sender", "x@big.example").stdout
    assert f"  warn: more than 50 messages a day -> policy: {ACTION}" in out.splitlines()


def test_sighup_applies_new_actions(server: tuple) -> None:  # type: ignore[type-arg]
    daemon, address, tmp = server
    cfg = tmp / "run.yaml"
    cfg.write_text(cfg.read_text().replace(ACTION, "REJECT 5.7.1 Limit reached"))
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in daemon.log(), 10, "the reload")
    client = Client(address)
    answers = [client.ask(request(sender="r@campus.example", instance=f"r{i}")) for i in range(6)]
    assert answers[-1] == "REJECT 5.7.1 Limit reached"

"""Run a private Postfix instance on loopback ports, configured from a temp directory."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Queue subdirectories that hold messages still to be delivered (see qmgr(8), postqueue(1)).
PENDING_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")


@dataclass(frozen=True, slots=True)
class PostfixSettings:
    """Ports, names and timers of the private instance."""

    smtp_port: int  # stands in for port 25
    submission_port: int  # stands in for port 587
    sink_port: int  # where every domain is relayed to
    myhostname: str = "relay1.campus.example"
    mydomain: str = "campus.example"
    mynetworks: tuple[str, ...] = ("127.0.0.2/32", "127.0.0.4/32")
    queue_run_delay: int = 2  # seconds, for all four timers
    minimal_backoff: int = 2
    maximal_backoff: int = 4
    queue_lifetime: int = 3600  # seconds; the expiry case shortens this
    long_queue_ids: bool = False
    # More main.cf settings, (name, value), written after (and overriding) the above;
    # e.g. smtpd_end_of_data_restrictions for a policy service under test.
    main_cf_extra: tuple[tuple[str, str], ...] = ()
    # More master.cf lines (services, their "  -o" lines), appended to the above.
    master_cf_extra: tuple[str, ...] = ()


class PostfixInstance:
    """A Postfix with its own config, queue and data directories under `base`."""

    def __init__(self, base: Path, settings: PostfixSettings) -> None:
        self.base = base
        self.settings = settings
        self.config_dir = base / "etc"
        self.queue_dir = base / "spool"
        self.data_dir = base / "data"
        # Debian's Postfix reads $config_directory/sasl/smtpd.conf whatever
        # cyrus_sasl_config_path says (README.Debian: "SASL configuration goes in
        # /etc/postfix/sasl"); upstream reads $cyrus_sasl_config_path/smtpd.conf.
        self.sasl_dir = self.config_dir / "sasl"
        self.log_dir = base / "log"
        self.maillog_file = self.log_dir / "postlogd.log"
        self.env = {**os.environ, "TZ": "UTC", "MAIL_CONFIG": str(self.config_dir)}

    def write_config(self) -> None:
        """Create the directories, main.cf, master.cf and the Cyrus SASL config."""
        for path in (self.config_dir, self.queue_dir, self.data_dir, self.sasl_dir, self.log_dir):
            path.mkdir(parents=True, exist_ok=True)
        # Postfix daemons run as `postfix` and open some of these by absolute path.
        self.base.chmod(0o755)
        shutil.chown(self.data_dir, "postfix", "postfix")
        self.data_dir.chmod(0o700)
        self.sasl_dir.chmod(0o750)
        shutil.chown(self.sasl_dir, "root", "postfix")
        (self.config_dir / "main.cf").write_text(self._main_cf())
        (self.config_dir / "master.cf").write_text(self._master_cf())
        # Cyrus reads <cyrus_sasl_config_path>/<smtpd_sasl_path>.conf, i.e. smtpd.conf.
        (self.sasl_dir / "smtpd.conf").write_text(
            "pwcheck_method: auxprop\n"
            "auxprop_plugin: sasldb\n"
            "mech_list: PLAIN LOGIN\n"
            f"sasldb_path: {self.sasl_dir / 'sasldb2'}\n"
        )

    def _main_cf(self) -> str:
        s = self.settings
        lines = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": s.myhostname,
            "mydomain": s.mydomain,
            "myorigin": "$mydomain",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": " ".join(s.mynetworks),
            "relay_domains": "",
            # Every domain, local ones included (bounces to our senders), goes to the sink.
            "transport_maps": f"inline:{{ *=smtp:[127.0.0.1]:{s.sink_port} }}",
            "smtpd_relay_restrictions": (
                "permit_mynetworks, permit_sasl_authenticated, defer_unauth_destination"
            ),
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            "smtputf8_enable": "no",
            "biff": "no",
            "append_dot_mydomain": "no",
            "delay_warning_time": "0",
            "maillog_file": str(self.maillog_file),
            "maillog_file_prefixes": str(self.log_dir),
            "queue_run_delay": f"{s.queue_run_delay}s",
            "minimal_backoff_time": f"{s.minimal_backoff}s",
            "maximal_backoff_time": f"{s.maximal_backoff}s",
            "maximal_queue_lifetime": f"{s.queue_lifetime}s",
            "bounce_queue_lifetime": f"{s.queue_lifetime}s",
            "smtpd_sasl_type": "cyrus",
            "smtpd_sasl_path": "smtpd",
            "cyrus_sasl_config_path": str(self.sasl_dir),
            "smtpd_sasl_auth_enable": "no",
            "smtpd_banner": "$myhostname ESMTP",
            "enable_long_queue_ids": "yes" if s.long_queue_ids else "no",
        }
        lines.update(s.main_cf_extra)
        return "".join(f"{key} = {value}\n" for key, value in lines.items())

    def _master_cf(self) -> str:
        s = self.settings
        # Nothing chrooted: the instance lives in a temp dir without the chroot's files.
        services = [
            f"127.0.0.1:{s.smtp_port} inet n - n - - smtpd",
            f"127.0.0.1:{s.submission_port} inet n - n - - smtpd",
            "  -o syslog_name=postfix/submission",
            "  -o smtpd_sasl_auth_enable=yes",
            "  -o smtpd_tls_security_level=none",
            "  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject",
            "pickup unix n - n 60 1 pickup",
            "cleanup unix n - n - 0 cleanup",
            "qmgr unix n - n 300 1 qmgr",
            "rewrite unix - - n - - trivial-rewrite",
            "bounce unix - - n - 0 bounce",
            "defer unix - - n - 0 bounce",
            "trace unix - - n - 0 bounce",
            "verify unix - - n - 1 verify",
            "flush unix n - n 1000? 0 flush",
            "proxymap unix - - n - - proxymap",
            "proxywrite unix - - n - 1 proxymap",
            "smtp unix - - n - - smtp",
            "relay unix - - n - - smtp",
            "showq unix n - n - - showq",
            "error unix - - n - - error",
            "retry unix - - n - - error",
            "discard unix - - n - - discard",
            "local unix - n n - - local",
            "anvil unix - - n - 1 anvil",
            "scache unix - - n - 1 scache",
            "postlog unix-dgram n - n - 1 postlogd",
            *s.master_cf_extra,
        ]
        return "\n".join(services) + "\n"

    @property
    def mail_version(self) -> str:
        """Return Postfix's version as postconf reports it."""
        proc = subprocess.run(
            ["postconf", "-c", str(self.config_dir), "-h", "mail_version"],
            capture_output=True,
            text=True,
            check=True,
            env=self.env,
        )
        return proc.stdout.strip()

    def add_sasl_user(self, user: str, realm: str, password: str) -> None:
        """Add `user@realm` with `password` to the instance's sasldb2."""
        db = self.sasl_dir / "sasldb2"
        subprocess.run(
            ["saslpasswd2", "-f", str(db), "-c", "-p", "-u", realm, user],
            input=password.encode(),
            check=True,
            env=self.env,
        )
        shutil.chown(db, "root", "postfix")
        db.chmod(0o640)

    def postfix(self, *args: str) -> None:
        """Run `postfix -c CONFIG_DIR ARGS`; raise if it fails."""
        subprocess.run(["postfix", "-c", str(self.config_dir), *args], check=True, env=self.env)

    def start(self) -> None:
        """Start the master daemon (it forks into the background)."""
        self.postfix("check")
        self.postfix("start")

    def master_pid(self) -> int | None:
        """Return the running master's pid from its pid file, or None."""
        pid_file = self.queue_dir / "pid" / "master.pid"
        try:
            pid = int(pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return None if process_gone(pid) else pid

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the master and its children if running; kill them if they outlive `timeout`."""
        pid = self.master_pid()
        if pid is None:
            return
        try:
            self.postfix("stop")
        except subprocess.CalledProcessError:
            log.warning("postfix stop failed; killing master pid=%s", pid)
        if not wait_for_exit(pid, timeout):
            log.warning("postfix master outlived stop; killing pid=%s", pid)
            os.killpg(os.getpgid(pid), signal.SIGKILL)
            wait_for_exit(pid, 5.0)

    def queued_ids(self) -> list[str]:
        """Return the queue ids of messages not yet delivered, from `postqueue -j`."""
        proc = subprocess.run(
            ["postqueue", "-c", str(self.config_dir), "-j"],
            capture_output=True,
            check=True,
            env=self.env,
        )
        return [json.loads(line)["queue_id"] for line in proc.stdout.splitlines() if line]

    def queue_files(self) -> list[Path]:
        """Return the files in the pending queues (also sees messages showq has not listed)."""
        files = []
        for name in PENDING_QUEUES:
            files += [p for p in (self.queue_dir / name).rglob("*") if p.is_file()]
        return files

    def sendmail(self, sender: str, recipients: list[str], message: bytes) -> None:
        """Submit `message` locally through sendmail(1), postdrop and pickup."""
        subprocess.run(
            ["sendmail", "-C", str(self.config_dir), "-f", sender, "-i", "--", *recipients],
            input=message,
            check=True,
            env=self.env,
        )


def process_gone(pid: int) -> bool:
    """Return True if `pid` has exited; reap it if it is our (adopted) child."""
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        reaped = 0
    if reaped == pid:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    # Field 3, after the parenthesised command name: Z (zombie) or X (dead) means exited.
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Poll until process `pid` is gone; return False if it still runs after `timeout`."""
    deadline = time.monotonic() + timeout
    while not process_gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True

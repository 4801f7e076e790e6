#!/bin/sh
# Install what mailtally's tests and demo need on Debian 12, then build .venv.
# Run as root; safe to run again (installs only what is missing).
set -eu

APT_PACKAGES="python3 python3-venv python3-dev gcc pkg-config libsystemd-dev sqlite3 make
postfix rsyslog sasl2-bin libsasl2-modules pflogsumm systemd-journal-remote logrotate openssl
prometheus policyd-rate-limit chromium fonts-noto-cjk"

missing=""
for pkg in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup-debian: missing packages:$missing (run as root to install them)" >&2
        exit 1
    fi
    # Postfix must not ask questions or start on install; tests run their own instance.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
fi

VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    /usr/bin/python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e '.[journal,test]'

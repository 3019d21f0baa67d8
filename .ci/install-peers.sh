#!/usr/bin/env bash
# Install the real third-party peers the test suite talks to (tests/peers.py), on a fresh
# Debian 12, as root, non-interactively:
#   postfix, dovecot-imapd, swaks (+ libnet-ssleay-perl for its --tls), haproxy, openssl,
#   and the milters rspamd and opendkim (+ opendkim-tools for opendkim-genkey).
# dovecot-core alone serves the AUTH tests' SASL (tests/dovecot.py DovecotAuth: `protocols =
# none`, the auth service on a loopback inet_listener); it comes with dovecot-imapd and is
# named below so that it stays if the IMAP package goes.
# man-db (with groff-base) renders the manual pages for tests/test_manpages.py
# (`man --warnings -l`).
# unbound, nsd and ldnsutils serve the destinations' DNS tests (tests/dnszones.py): zones signed
# with ldns-signzone, served by a private nsd and validated by a private unbound, both on
# ephemeral loopback ports with their own configs; the system unbound (which would take port 53
# and, through unbound-resolvconf, /etc/resolv.conf) and nsd are kept stopped and disabled.
# promtool (tests/test_prometheus_rules.py checks deploy/prometheus/alerts.yml) comes with
# Debian's prometheus package, installed without its recommends (node exporter and friends):
# 9 packages instead of 31. Its prometheus service is kept stopped and disabled like the rest.
# The tests run private instances on ephemeral loopback ports with their own config
# directories, so the system services these packages ship are kept stopped and disabled.
# Works with or without systemd (containers).
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "install-peers.sh: must run as root" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
SERVICES=(postfix dovecot haproxy nginx rspamd opendkim redis-server prometheus unbound unbound-resolvconf nsd)
# build tools for the venv and the native core, then the real peers the tests talk to
PACKAGES=(python3-venv python3-dev gcc postfix dovecot-core dovecot-imapd swaks libnet-ssleay-perl haproxy openssl nginx libnginx-mod-mail
          rspamd opendkim opendkim-tools man-db unbound nsd ldnsutils)
# only what is needed of these (see above)
NO_RECOMMENDS=(prometheus)

# Keep maintainer scripts from starting daemons while installing (invoke-rc.d honours
# policy-rc.d; exit 101 = "action forbidden").  Only if nobody else installed one.
POLICY=/usr/sbin/policy-rc.d
created_policy=
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$POLICY"
    chmod 0755 "$POLICY"
    created_policy=1
fi
cleanup() {
    if [ -n "$created_policy" ]; then
        rm -f "$POLICY"
    fi
}
trap cleanup EXIT

apt-get update
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
apt-get install -y "${PACKAGES[@]}"
apt-get install -y --no-install-recommends "${NO_RECOMMENDS[@]}"

# Stop and disable whatever the packages started or enabled.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    for svc in "${SERVICES[@]}"; do
        systemctl disable --now "$svc" >/dev/null 2>&1 || true
    done
else
    for svc in "${SERVICES[@]}"; do
        if [ -x "/etc/init.d/$svc" ]; then
            "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
        fi
        if command -v update-rc.d >/dev/null 2>&1; then
            update-rc.d "$svc" disable >/dev/null 2>&1 || true
        fi
    done
    if command -v systemctl >/dev/null 2>&1; then
        # systemd installed but not running (container): remove the enablement links.
        for svc in "${SERVICES[@]}"; do
            systemctl disable "$svc" >/dev/null 2>&1 || true
        done
    fi
fi
# A default-configured postfix that still runs (e.g. started outside init) is stopped too.
if [ -f /etc/postfix/main.cf ]; then
    postfix stop >/dev/null 2>&1 || true
fi

# Sanity check: every tool the peers need is there.
missing=
for tool in postfix postconf swaks openssl haproxy dovecot rspamd opendkim opendkim-genkey promtool \
            unbound unbound-checkconf nsd nsd-checkconf ldns-keygen ldns-signzone ldns-key2ds; do
    if ! PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null 2>&1; then
        echo "install-peers.sh: $tool missing after install" >&2
        missing=1
    fi
done
if ! perl -MNet::SSLeay -e 1 2>/dev/null; then
    echo "install-peers.sh: perl Net::SSLeay missing (swaks --tls)" >&2
    missing=1
fi
if ! id postfix >/dev/null 2>&1 || ! getent group postdrop >/dev/null 2>&1; then
    echo "install-peers.sh: postfix user/postdrop group missing" >&2
    missing=1
fi
# the private milter instances drop to the users the packages create (tests/milters.py)
for user in _rspamd opendkim; do
    if ! id "$user" >/dev/null 2>&1; then
        echo "install-peers.sh: user $user missing" >&2
        missing=1
    fi
done
[ -z "$missing" ]
echo "install-peers.sh: peers installed: $(postconf -d -h mail_version 2>/dev/null | sed 's/^/postfix /')"

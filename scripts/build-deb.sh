#!/usr/bin/env bash
# Builds the Debian package of callbus: the release binary, the systemd unit, a commented
# default /etc/callbus/callbus.toml and the OpenSIPS script example.
#   bash scripts/build-deb.sh [OUT_DIR]      (default: target/debian)
# Then: dpkg -i target/debian/callbus_<version>_<arch>.deb && systemctl enable --now callbus
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/debian}"

version=$(awk -F'"' '/^\[workspace.package\]/ { in_ws = 1 } in_ws && /^version/ { print $2; exit }' Cargo.toml)
arch=$(dpkg --print-architecture)
echo "building callbus ${version} (${arch}) in release mode"
cargo build --release -p callbus

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
install -D -m 755 target/release/callbus "$root/usr/bin/callbus"
strip "$root/usr/bin/callbus" 2>/dev/null || true
install -D -m 644 deploy/systemd/callbus.service "$root/lib/systemd/system/callbus.service"
install -D -m 640 deploy/callbus.toml "$root/etc/callbus/callbus.toml"
install -D -m 644 deploy/opensips/opensips.cfg "$root/usr/share/doc/callbus/opensips.cfg"
install -D -m 644 README.md "$root/usr/share/doc/callbus/README.md"
cp -r docs "$root/usr/share/doc/callbus/docs"
chmod -R u=rwX,go=rX "$root/usr/share/doc/callbus/docs"
printf 'callbus\nLicense: Apache-2.0\n' > "$root/usr/share/doc/callbus/copyright"

mkdir -p "$root/DEBIAN"
cat > "$root/DEBIAN/control" <<CONTROL
Package: callbus
Version: ${version}
Architecture: ${arch}
Maintainer: callbus <callbus@localhost>
Section: net
Priority: optional
Depends: libc6, adduser
Recommends: nats-server
Suggests: opensips
Description: OpenSIPS calls over NATS, with a replayable event log
 callbus lets applications originate, answer, hold, transfer and end calls on
 OpenSIPS 3.4+ by talking to NATS, and keeps every call as an append-only event
 log that can be replayed. The unit runs "callbus up" with /etc/callbus/callbus.toml.
CONTROL
echo "/etc/callbus/callbus.toml" > "$root/DEBIAN/conffiles"

cat > "$root/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = "configure" ]; then
    if ! getent passwd callbus >/dev/null; then
        adduser --system --group --home /var/lib/callbus --no-create-home --quiet callbus
    fi
    chgrp callbus /etc/callbus/callbus.toml
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null || true
        echo "callbus installed: edit /etc/callbus/callbus.toml, then: systemctl enable --now callbus"
    fi
fi
POSTINST
cat > "$root/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = "remove" ]; then
    systemctl stop callbus >/dev/null 2>&1 || true
fi
PRERM
cat > "$root/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
fi
if [ "$1" = "purge" ]; then
    # The event log stays in /var/lib/callbus unless removed by hand.
    rm -rf /etc/callbus
fi
POSTRM
chmod 755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"

mkdir -p "$out"
deb="$out/callbus_${version}_${arch}.deb"
dpkg-deb --build --root-owner-group "$root" "$deb" >/dev/null
echo "built $deb ($(du -h "$deb" | cut -f1))"

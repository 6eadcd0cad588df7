#!/usr/bin/env bash
# Builds OpenSIPS 3.4 from its source tree with only the modules callbus needs, and installs it
# under PREFIX. Run it outside this repository; point CALLBUS_OPENSIPS at PREFIX afterwards.
#
#   scripts/build-opensips.sh SRC PREFIX
#
# SRC is a checkout of OpenSIPS's public source, branch 3.4 (e.g. a clone of the OpenSIPS/opensips
# repository with `git checkout 3.4`). Needs a C compiler, make, bison, flex, libxml2-dev and
# pkg-config (Debian: `apt-get install build-essential bison flex libxml2-dev pkg-config`).
# Takes about 2 minutes on 2 cores. Nothing of OpenSIPS is copied into this repository.
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 SRC PREFIX   (SRC: OpenSIPS 3.4 source tree; PREFIX: where to install it)" >&2
    exit 2
fi
src=$1
prefix=$2

if [ ! -f "$src/Makefile.defs" ] || [ ! -d "$src/modules/callops" ]; then
    echo "$src is not an OpenSIPS source tree (no Makefile.defs or modules/callops): clone OpenSIPS/opensips and check out branch 3.4" >&2
    exit 2
fi
major=$(awk -F' *= *' '$1 == "VERSION_MAJOR" { print $2 }' "$src/Makefile.defs")
minor=$(awk -F' *= *' '$1 == "VERSION_MINOR" { print $2 }' "$src/Makefile.defs")
if [ "$major.$minor" != "3.4" ]; then
    echo "$src holds OpenSIPS $major.$minor; callbus's tier and configuration are written for 3.4 (git checkout 3.4)" >&2
    exit 2
fi
for tool in make cc bison flex pkg-config; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "missing '$tool': apt-get install build-essential bison flex libxml2-dev pkg-config" >&2
        exit 2
    fi
done

# What deploy/opensips/opensips.cfg loads, and nothing more.
modules="proto_udp signaling sl tm rr maxfwd sipmsgops textops dialog callops b2b_entities mi_datagram event_datagram"
jobs=$(nproc 2>/dev/null || echo 2)
mkdir -p "$prefix"
prefix=$(cd "$prefix" && pwd)

echo "building OpenSIPS $major.$minor from $src into $prefix (modules: $modules)"
# `module=` restricts the module list; the core and the modules are built in one make run.
make -C "$src" -j"$jobs" prefix="$prefix" module="$modules" all
make -C "$src" prefix="$prefix" module="$modules" install-bin install-modules
"$prefix/sbin/opensips" -V | head -n 1
echo "installed: export CALLBUS_OPENSIPS=$prefix"

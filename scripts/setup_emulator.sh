#!/usr/bin/env bash
# Sets up the emulated-core cost (mnv2_tvm.emulate) on Debian 12; idempotent, quiet when done.
#   apt: qemu-user (the *dynamic* qemu, which loads TCG plugins; it coexists with the virtual
#        board's qemu-user-static + binfmt-support: different binary names, no binfmt
#        registration because qemu-user-binfmt, a Recommends, is not installed), gcc,
#        pkg-config and libglib2.0-dev (the plugin API header includes glib.h), llvm-19 (llvm-mca:
#        the core model costs each executed block with LLVM's scheduling model of the core; 19
#        has Zen 4's).
#   header: include/qemu/qemu-plugin.h of the installed qemu's own Debian source package
#        (a private apt sources file with a deb-src line; the system's apt state is untouched).
#   plugin: our mnv2_tvm/emulate/plugin/mnv2cost.c, built into the cache (rebuilt when the
#        source changes), and the runtime-only x86-64 TVM site the qemu-x86_64 guest imports.
#   peers: ONNX Runtime's and ncnn's aarch64 wheels for the guest and pnnx for the host
#        (scripts/bench_arm.py), installed with the host's pip into the cache's peers/ folder;
#        optional: a peer that does not install is reported and the set-up goes on.
# Cache: ${MNV2_TVM_EMULATE_DIR:-~/.cache/mnv2-tvm/emulate}.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${MNV2_TVM_EMULATE_DIR:-$HOME/.cache/mnv2-tvm/emulate}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
say() { echo "setup_emulator: $*"; }

APT_PACKAGES=(qemu-user gcc pkg-config libglib2.0-dev llvm-19)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "apt-get install ${missing[*]}"
    $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
        --no-install-recommends "${missing[@]}" >/dev/null
fi

# The header must match the installed qemu (plugin API version): key it by the source version.
SRC_VERSION="$(dpkg-query -W -f='${source:Version}' qemu-user)"
HEADER="$CACHE/include/qemu-plugin.h"
STAMP="$CACHE/include/qemu-source-version"
if [ ! -s "$HEADER" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$SRC_VERSION" ]; then
    say "qemu-plugin.h from Debian's qemu $SRC_VERSION source package"
    APT_DIR="$CACHE/apt"
    mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/parts" "$APT_DIR/archives/partial" "$CACHE/include"
    # Source lines for the mirrors this machine already uses: its own apt sources, deb → deb-src.
    : > "$APT_DIR/sources.list"
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] && sed -n 's/^deb \(.*\)/deb-src \1/p' "$f" >> "$APT_DIR/sources.list"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && sed 's/^Types: *deb$/Types: deb-src/' "$f" > "$APT_DIR/parts/$(basename "$f")"
    done
    APT_OPTS=(-o "Dir::Etc::SourceList=$APT_DIR/sources.list" -o "Dir::Etc::SourceParts=$APT_DIR/parts"
              -o "Dir::State::Lists=$APT_DIR/lists" -o "Dir::Cache::Archives=$APT_DIR/archives"
              -o "APT::Sandbox::User=root" -o "Debug::NoLocking=1")
    apt-get "${APT_OPTS[@]}" update -qq
    SRC_DIR="$APT_DIR/source"
    rm -rf "$SRC_DIR" && mkdir -p "$SRC_DIR"
    # The exact version when the archive still has it; any 7.2 otherwise (same plugin API).
    (cd "$SRC_DIR" && { apt-get "${APT_OPTS[@]}" source -qq --download-only "qemu=$SRC_VERSION" 2>/dev/null \
                        || apt-get "${APT_OPTS[@]}" source -qq --download-only qemu; }) >/dev/null
    ORIG="$(ls "$SRC_DIR"/qemu_*.orig.tar.* | head -1)"
    tmp="$(mktemp -d)"
    tar -xf "$ORIG" -C "$tmp" --wildcards '*/include/qemu/qemu-plugin.h'
    found="$(find "$tmp" -path '*/include/qemu/qemu-plugin.h' | head -1)"
    [ -n "$found" ] || { echo "setup_emulator: qemu-plugin.h not in $ORIG" >&2; exit 1; }
    # Debian's patches do not touch this header in 7.2; stop rather than build against a stale one.
    DEB="$(ls "$SRC_DIR"/qemu_*.debian.tar.* 2>/dev/null | head -1 || true)"
    if [ -n "$DEB" ] && tar -xOf "$DEB" --wildcards 'debian/patches/*' 2>/dev/null | grep -q '^+++ .*include/qemu/qemu-plugin.h'; then
        echo "setup_emulator: Debian's qemu $SRC_VERSION patches include/qemu/qemu-plugin.h; apply it in $0" >&2
        exit 1
    fi
    cp "$found" "$HEADER.tmp" && mv "$HEADER.tmp" "$HEADER"
    echo "$SRC_VERSION" > "$STAMP"
    rm -rf "$tmp" "$SRC_DIR"
fi

# Our plugin (rebuilt when its source changes) and the x86-64 guest's runtime-only TVM site.
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
MNV2_TVM_EMULATE_DIR="$CACHE" "$PY" -c "from mnv2_tvm.emulate.setup import main; raise SystemExit(main())"
# Peers for scripts/bench_arm.py (mnv2_tvm/emulate/peers.py): never pip under qemu; not fatal.
MNV2_TVM_EMULATE_DIR="$CACHE" "$PY" -m mnv2_tvm.emulate.peers || say "peers not installed (scripts/bench_arm.py reports them as failed)"

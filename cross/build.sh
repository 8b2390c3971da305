#!/usr/bin/env bash
# cross/build.sh TARGET [PROFILE]: build emberd for a board's target triple
# and leave it at target/TARGET/PROFILE/emberd (PROFILE: release by default;
# `qemu` is the unoptimised-LTO profile the CI tests with).
#
#   cross/build.sh aarch64-unknown-linux-gnu       # Pi 3/4/5 64-bit, Jetson
#   cross/build.sh armv7-unknown-linux-gnueabihf   # 32-bit Raspberry Pi OS
#   cross/build.sh x86_64-unknown-linux-gnu        # x86 edge boxes
#
# Installs what it needs (Debian gcc cross compiler, rustup target) and prints
# the binary's size and the newest glibc symbol version it needs.
# EMBER_GLIBC=2.31 links against that glibc instead of this machine's (through
# cargo-zigbuild, installed from PyPI into target/zig-venv), for older OSes.
set -euo pipefail
. "$(dirname "$0")/env.sh"
profile=${2:-release}

if [ -n "${EMBER_GLIBC:-}" ]; then
    # Link against an older glibc (e.g. 2.31 for Raspberry Pi OS Bullseye and
    # JetPack 5) with cargo-zigbuild; zig and cargo-zigbuild come from PyPI.
    venv=target/zig-venv
    [ -x "$venv/bin/cargo-zigbuild" ] || {
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q ziglang cargo-zigbuild
    }
    PATH="$root/$venv/bin:$PATH" cargo zigbuild -p emberd --bin emberd --profile "$profile" \
        --target "$target.$EMBER_GLIBC"
else
    cargo build -p emberd --bin emberd --profile "$profile" --target "$target"
fi
bin=$(emberd_path "$profile")
size=$(stat -c %s "$bin")
awk -v b="$bin" -v s="$size" -v g="$(glibc_needed "$bin")" \
    'BEGIN { printf "%s: %d bytes (%.1f MiB), needs %s\n", b, s, s / 1048576, g }'

#!/usr/bin/env bash
# cross/test.sh TARGET: build ember-kernels' tests for a board's target triple
# and run them under qemu-user, once per emulated CPU model, each run asserting
# (EMBER_EXPECT_ISA) which kernels detection must pick, so a run cannot pass by
# silently using only the scalar path.
#
#   cross/test.sh aarch64-unknown-linux-gnu       # Cortex-A72 (Pi 4) and A76 (Pi 5)
#   cross/test.sh armv7-unknown-linux-gnueabihf   # Cortex-A7 (Pi 2/3 on 32-bit OS) and A15
#
# Installs what it needs: Debian's qemu-user and gcc cross compiler, the rustup
# target. PROPTEST_CASES (default 64 here) sets the property-test cases per kernel.
set -euo pipefail

target=${1:?usage: cross/test.sh TARGET}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

case $target in
aarch64-unknown-linux-gnu)
    gcc=aarch64-linux-gnu-gcc pkg=gcc-aarch64-linux-gnu qemu=qemu-aarch64
    sysroot=/usr/aarch64-linux-gnu
    # cpu-model:expected-isa
    runs=(cortex-a72:neon cortex-a76:neon-dotprod)
    ;;
armv7-unknown-linux-gnueabihf)
    gcc=arm-linux-gnueabihf-gcc pkg=gcc-arm-linux-gnueabihf qemu=qemu-arm
    sysroot=/usr/arm-linux-gnueabihf
    runs=(cortex-a7:neon cortex-a15:neon)
    ;;
*)
    echo "cross/test.sh: unsupported target $target" >&2
    exit 2
    ;;
esac

sudo=
[ "$(id -u)" = 0 ] || sudo=sudo
if ! command -v "$qemu" >/dev/null || ! command -v "$gcc" >/dev/null; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq qemu-user "$pkg" >/dev/null
fi
rustup target list --installed | grep -qx "$target" || rustup target add "$target"

var=$(echo "$target" | tr 'a-z-' 'A-Z_')
export PROPTEST_CASES=${PROPTEST_CASES:-64}
export RUST_BACKTRACE=1
# Build once (the runner does not affect the build).
cargo test -p ember-kernels --profile qemu --target "$target" --no-run
for run in "${runs[@]}"; do
    cpu=${run%%:*} isa=${run#*:}
    echo "== $target on qemu -cpu $cpu, expecting $isa kernels"
    env "CARGO_TARGET_${var}_RUNNER=$qemu -cpu $cpu -L $sysroot" EMBER_EXPECT_ISA="$isa" \
        cargo test -p ember-kernels --profile qemu --target "$target" --lib
done

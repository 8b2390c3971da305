# Sourced by cross/*.sh: what each target needs, and installing it.
# Sets: target gcc pkg qemu sysroot deb_arch runs (cpu-model:expected-isa).
# Installs (when missing): Debian's gcc cross compiler and qemu-user, the
# rustup target.

target=${1:?usage: $0 TARGET}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

case $target in
x86_64-unknown-linux-gnu)
    gcc=gcc pkg=gcc qemu= sysroot=/ deb_arch=amd64
    runs=()
    ;;
aarch64-unknown-linux-gnu)
    gcc=aarch64-linux-gnu-gcc pkg=gcc-aarch64-linux-gnu qemu=qemu-aarch64
    sysroot=/usr/aarch64-linux-gnu deb_arch=arm64
    runs=(cortex-a72:neon cortex-a76:neon-dotprod)
    ;;
armv7-unknown-linux-gnueabihf)
    gcc=arm-linux-gnueabihf-gcc pkg=gcc-arm-linux-gnueabihf qemu=qemu-arm
    sysroot=/usr/arm-linux-gnueabihf deb_arch=armhf
    runs=(cortex-a7:neon cortex-a15:neon)
    ;;
*)
    echo "$0: unsupported target $target (x86_64-unknown-linux-gnu, aarch64-unknown-linux-gnu, armv7-unknown-linux-gnueabihf)" >&2
    exit 2
    ;;
esac
# binutils of the target (strip, readelf) come with the gcc cross package.
tool_prefix=${gcc%gcc}

sudo=
[ "$(id -u)" = 0 ] || sudo=sudo
need=()
command -v "$gcc" >/dev/null || need+=("$pkg")
[ -z "$qemu" ] || command -v "$qemu" >/dev/null || need+=(qemu-user)
if [ ${#need[@]} -gt 0 ]; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
rustup target list --installed | grep -qx "$target" || rustup target add "$target"
var=$(echo "$target" | tr 'a-z-' 'A-Z_')

# The newest glibc symbol version a binary needs (the oldest glibc it runs on).
glibc_needed() {
    "${tool_prefix}readelf" -W --dyn-syms "$1" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1
}

# Where cargo leaves emberd for this target and a profile.
emberd_path() {
    local dir=$1
    [ "$dir" = dev ] && dir=debug
    echo "target/$target/$dir/emberd"
}

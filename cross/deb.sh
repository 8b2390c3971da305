#!/usr/bin/env bash
# cross/deb.sh TARGET [PROFILE]: the emberd .deb for TARGET's Debian
# architecture (amd64, arm64, armhf), left in target/deb/. Builds with
# cross/build.sh (PROFILE: release by default; linked against glibc 2.31
# unless EMBER_GLIBC says otherwise) unless EMBER_BIN names an emberd binary
# for that target to package instead (CI packages its test builds this way).
#
# Contents: /usr/bin/emberd (stripped), the systemd units, sysusers and
# tmpfiles snippets, a commented /etc/ember/ember.toml (conffile), the demo
# models in /usr/share/ember/models, docs. Maintainer scripts create the
# `ember` user and enable/start the units the way dh_installsystemd does.
# Then runs lintian (when installed; fails on errors and warnings), unpacks
# the package into a throw-away root (dpkg -x) and has the installed binary
# (under qemu-user for arm64/armhf), with the installed configuration and demo
# models, answer a completion on a Unix socket.
set -euo pipefail
. "$(dirname "$0")/env.sh"
profile=${2:-release}
if [ -n "${EMBER_BIN:-}" ]; then
    bin=$EMBER_BIN
else
    # Packages link against glibc 2.31 by default (cargo-zigbuild) so one .deb
    # installs on Raspberry Pi OS Bullseye and Bookworm, Ubuntu 20.04 and 22.04
    # (JetPack 5 and 6); EMBER_GLIBC= (empty) links against this machine's.
    EMBER_GLIBC=${EMBER_GLIBC-2.31} "$(dirname "$0")/build.sh" "$target" "$profile"
    bin=$(emberd_path "$profile")
fi

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
name=emberd_${version}_${deb_arch}
stage=target/deb/$name
rm -rf "$stage"
mkdir -p "$stage/DEBIAN"
# Reproducible timestamps: the last commit's time.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}

install -D -m 755 "$bin" "$stage/usr/bin/emberd"
"${tool_prefix}strip" --remove-section=.comment --remove-section=.note --strip-unneeded "$stage/usr/bin/emberd"
install -D -m 644 systemd/emberd.service "$stage/lib/systemd/system/emberd.service"
install -D -m 644 systemd/emberd.socket "$stage/lib/systemd/system/emberd.socket"
install -D -m 644 systemd/emberd.sysusers "$stage/usr/lib/sysusers.d/emberd.conf"
install -D -m 644 systemd/emberd.tmpfiles "$stage/usr/lib/tmpfiles.d/emberd.conf"
install -D -m 644 cross/deb/ember.toml "$stage/etc/ember/ember.toml"
for m in kjv-gpt2 kjv-lstm; do
    for f in models/$m/*; do
        install -D -m 644 "$f" "$stage/usr/share/ember/models/$m/$(basename "$f")"
    done
done
doc=$stage/usr/share/doc/emberd
install -D -m 644 README.md "$doc/README.md"
install -D -m 644 cross/deb/copyright "$doc/copyright"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
{
    printf 'emberd (%s) unstable; urgency=medium\n\n' "$version"
    printf '  * Built from the ember source tree at %s.\n\n' "$commit"
    printf ' -- Ember developers <ember@example.invalid>  %s\n' "$(date -R -u -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n > "$doc/changelog.gz"
chmod 644 "$doc/changelog.gz"
mkdir -p "$stage/usr/share/man/man1"
gzip -9n < cross/deb/emberd.1 > "$stage/usr/share/man/man1/emberd.1.gz"
chmod 644 "$stage/usr/share/man/man1/emberd.1.gz"

# Dependencies from the binary's NEEDED libraries.
glibc=$(glibc_needed "$stage/usr/bin/emberd")
depends="libc6 (>= ${glibc#GLIBC_}), adduser"
if "${tool_prefix}readelf" -d "$stage/usr/bin/emberd" | grep -q 'libgcc_s'; then
    depends="$depends, libgcc-s1 (>= 4.2)"
fi
cat > "$stage/DEBIAN/control" <<CONTROL
Package: emberd
Version: $version
Architecture: $deb_arch
Maintainer: Ember developers <ember@example.invalid>
Installed-Size: $(du -sk --exclude=DEBIAN "$stage" | cut -f1)
Depends: $depends
Suggests: mosquitto-clients, curl
Section: net
Priority: optional
Description: serve int8 ONNX language models on small boards
 emberd runs int8-quantized decoder-only Transformer and LSTM language models
 (ONNX, as onnxruntime and Hugging Face Optimum export them) on Raspberry Pi,
 Jetson and x86 edge boxes, with its own NEON/AVX2/AVX-512 kernels chosen at
 run time. It serves text generation on a Unix socket (HTTP, OpenAI-style
 API) and over MQTT, under systemd (notify, watchdog, socket activation).
 .
 Two small demo models trained on the King James Bible are included.
CONTROL
echo /etc/ember/ember.toml > "$stage/DEBIAN/conffiles"
for s in postinst prerm postrm; do
    install -m 755 "cross/deb/$s" "$stage/DEBIAN/$s"
done
(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum > DEBIAN/md5sums)
chmod 644 "$stage/DEBIAN/md5sums" "$stage/DEBIAN/control" "$stage/DEBIAN/conffiles"
find "$stage" -newermt "@$SOURCE_DATE_EPOCH" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

deb=target/deb/$name.deb
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
printf '%s: %s bytes\n' "$deb" "$(stat -c %s "$deb")"
if command -v lintian >/dev/null; then
    lintian --fail-on error,warning --tag-display-limit 0 "$deb"
    echo "lintian: clean (errors and warnings)"
fi

echo "== installing $deb into a throw-away root and serving a request"
tmp=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$tmp"' EXIT
dpkg -x "$deb" "$tmp/root"
r=$tmp/root
run=("$r/usr/bin/emberd")
[ -z "$qemu" ] || run=("$qemu" -L "$sysroot" "$r/usr/bin/emberd")
"${run[@]}" --version
EMBER_LOG=info "${run[@]}" serve --config "$r/etc/ember/ember.toml" --socket "$tmp/ember.sock" \
    --model "kjv-gpt2=$r/usr/share/ember/models/kjv-gpt2" \
    --model "kjv-lstm=$r/usr/share/ember/models/kjv-lstm" 2> "$tmp/emberd.log" &
pid=$!
reply=$(curl -sS --fail --retry 120 --retry-delay 1 --retry-all-errors --unix-socket "$tmp/ember.sock" \
    http://localhost/v1/completions \
    -d '{"model": "kjv-lstm", "prompt": "And God said", "max_tokens": 8, "temperature": 0}') || {
    cat "$tmp/emberd.log" >&2
    exit 1
}
echo "$reply"
echo "$reply" | python3 -c 'import json, sys; d = json.load(sys.stdin); assert d["choices"][0]["text"] and d["usage"]["completion_tokens"] == 8, d'
kill -TERM "$pid"
wait "$pid"
echo "cross/deb.sh: $deb installs and serves"

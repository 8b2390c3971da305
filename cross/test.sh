#!/usr/bin/env bash
# cross/test.sh TARGET: prove a board's build on this x86_64 machine under
# qemu-user, once per emulated CPU model:
#  1. ember-kernels' tests, each run asserting (EMBER_EXPECT_ISA) which kernels
#     detection must pick, so a run cannot pass by silently using only the
#     scalar path;
#  2. end to end: `emberd generate` (greedy, 32 tokens) on each demo model (kjv-gpt2
#     on the native engine, kjv-lstm on both engines) and
#     prompt must print exactly the token ids and text of the x86_64 build.
#
#   cross/test.sh aarch64-unknown-linux-gnu       # Cortex-A72 (Pi 4) and A76 (Pi 5)
#   cross/test.sh armv7-unknown-linux-gnueabihf   # Cortex-A7 (Pi 2/3 on 32-bit OS) and A15
#
# Installs what it needs: Debian's qemu-user and gcc cross compiler, the rustup
# target. PROPTEST_CASES (default 64 here) sets the property-test cases per
# kernel. Builds use the `qemu` profile (optimised, no LTO, debug assertions
# and overflow checks on); the x86_64 reference is target/debug/emberd.
set -euo pipefail
. "$(dirname "$0")/env.sh"
[ -n "$qemu" ] || { echo "cross/test.sh: $target runs natively; use cargo test" >&2; exit 2; }

export PROPTEST_CASES=${PROPTEST_CASES:-64}
export RUST_BACKTRACE=1
# Build once (the runner does not affect the build).
cargo test -p ember-kernels --profile qemu --target "$target" --no-run
for run in "${runs[@]}"; do
    cpu=${run%%:*} isa=${run#*:}
    echo "== kernels: $target on qemu -cpu $cpu, expecting $isa kernels"
    env "CARGO_TARGET_${var}_RUNNER=$qemu -cpu $cpu -L $sysroot" EMBER_EXPECT_ISA="$isa" \
        cargo test -p ember-kernels --profile qemu --target "$target" --lib
done

echo "== end to end: greedy emberd generate, $target under qemu vs x86_64"
# The x86_64 reference: the emberd that `cargo test --workspace` builds (a
# no-op after the README's test command). `cargo build -p emberd` would
# resolve other features for the shared dependencies (the tests' broker and
# benches add some) and rebuild most of them: 6.5 minutes of a cold CI run.
cargo test --workspace --no-run
"$(dirname "$0")/build.sh" "$target" qemu
bin=$(emberd_path qemu)
# Token ids and text only (timings differ).
summary() {
    python3 -c 'import json, sys; d = json.load(sys.stdin); print(d["token_ids"], json.dumps(d["text"], ensure_ascii=False))'
}
fail=0
# kjv-gpt2 on the native int8 engine (forced: a load that fell back to tract
# would fail instead of passing unnoticed), also with a 16-bit and an 8-bit
# KV cache (one prompt each: the widening kernels), kjv-lstm on each engine.
for case in kjv-gpt2:native:f32:3 kjv-gpt2:native:f16:1 kjv-gpt2:native:i8:1 kjv-lstm:native:f32:3 kjv-lstm:tract:f32:3; do
    IFS=: read -r model backend kv prompts <<< "$case"
    all=("And God said" "In the beginning God created" "起初，神创造天地。")
    for prompt in "${all[@]:0:$prompts}"; do
        args=(generate --model "models/$model" --backend "$backend" --kv-cache "$kv" --max-tokens 32 --temperature 0 --json "$prompt")
        want=$(target/debug/emberd "${args[@]}" | summary)
        for run in "${runs[@]}"; do
            cpu=${run%%:*}
            got=$(EMBER_LOG=error "$qemu" -cpu "$cpu" -L "$sysroot" "$bin" "${args[@]}" | summary)
            if [ "$got" = "$want" ]; then
                echo "ok   $model ($backend, $kv KV) on $cpu: $prompt"
            else
                echo "FAIL $model ($backend, $kv KV) on $cpu: $prompt"
                echo "  x86_64: $want"
                echo "  $cpu: $got"
                fail=1
            fi
        done
    done
done
[ "$fail" = 0 ] || { echo "cross/test.sh: $target output differs from x86_64" >&2; exit 1; }
echo "cross/test.sh: $target kernels and end-to-end output match"

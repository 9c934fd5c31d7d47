#!/usr/bin/env bash
# Cross-builds its-agent for aarch64 Linux (Jetson with JetPack 6) on an x86_64 Debian 12 host,
# with Debian's own Rust compiler and its arm64 standard library. See cross/README.md.
#
#   cross/build-aarch64.sh [--install-deps] [--smoke-test] [-- EXTRA-CARGO-ARGS...]
#
# --install-deps  add the arm64 architecture and install the toolchain packages (needs root or sudo)
# --smoke-test    run the built binary's --version under qemu-aarch64
# CARGO_TARGET_DIR is respected (default: target/ in the workspace).
set -euo pipefail

TARGET=aarch64-unknown-linux-gnu
# glibc of the oldest supported box: JetPack 6 is Ubuntu 22.04.
BOX_GLIBC=2.35

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }

install_deps=0
smoke_test=0
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --install-deps) install_deps=1 ;;
    --smoke-test) smoke_test=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

if [ "$install_deps" -eq 1 ]; then
  as_root dpkg --add-architecture arm64
  as_root apt-get update
  as_root apt-get install -y --no-install-recommends \
    rustc-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu g++-aarch64-linux-gnu \
    libc6-dev-arm64-cross qemu-user
fi

# Debian's compiler, not rustup's: its arm64 standard library only works with it.
export RUSTC=/usr/bin/rustc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar

missing=0
need() {
  if ! command -v "$1" > /dev/null 2>&1; then
    echo "missing: $1 ($2)" >&2
    missing=1
  fi
}
need "$RUSTC" "Debian package rustc-web"
need aarch64-linux-gnu-gcc "Debian package gcc-aarch64-linux-gnu"
need aarch64-linux-gnu-g++ "Debian package g++-aarch64-linux-gnu"
need aarch64-linux-gnu-ar "Debian package binutils-aarch64-linux-gnu"
need cargo "cargo on PATH"
if [ "$smoke_test" -eq 1 ]; then need qemu-aarch64 "Debian package qemu-user"; fi
if [ "$missing" -eq 0 ]; then
  sysroot="$("$RUSTC" --print sysroot)"
  if ! compgen -G "$sysroot/lib/rustlib/$TARGET/lib/libstd-*.rlib" > /dev/null; then
    echo "missing: the $TARGET standard library in $sysroot/lib/rustlib (Debian package libstd-rust-web-dev:arm64)" >&2
    missing=1
  fi
fi
if [ "$missing" -ne 0 ]; then
  echo "run: $0 --install-deps" >&2
  exit 1
fi

echo "compiler: $("$RUSTC" --version)"
# All detector backends: tract, ONNX Runtime (CPU) and its TensorRT provider. ONNX Runtime is
# loaded at run time, so nothing of it is needed here (models/README.md says what the box needs).
cargo build --release --target "$TARGET" -p its-agent --features "${AGENT_FEATURES:-tensorrt}" ${extra[@]+"${extra[@]}"}

target_dir="${CARGO_TARGET_DIR:-$root/target}"
bin="$target_dir/$TARGET/release/its-agent"
if [ ! -x "$bin" ]; then
  echo "build finished but $bin is missing" >&2
  exit 1
fi

if command -v aarch64-linux-gnu-objdump > /dev/null 2>&1; then
  glibc="$(aarch64-linux-gnu-objdump -T "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/^GLIBC_//' | sort -u -V | tail -n 1 || true)"
  if [ -n "$glibc" ]; then
    echo "needs glibc >= $glibc on the box"
    if [ "$(printf '%s\n%s\n' "$glibc" "$BOX_GLIBC" | sort -V | tail -n 1)" != "$BOX_GLIBC" ]; then
      echo "warning: glibc $glibc is newer than JetPack 6's $BOX_GLIBC; the binary will not start there" >&2
    fi
  fi
fi

if [ "$smoke_test" -eq 1 ]; then
  # No -L /usr/aarch64-linux-gnu: the multiarch arm64 C library is found by default, and a
  # second one from -L makes the first thread creation hang.
  qemu-aarch64 "$bin" --version
fi

echo "built: $bin"

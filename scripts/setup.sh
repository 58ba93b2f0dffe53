#!/usr/bin/env bash
# Installs everything peft-cpp needs to build, test and run its examples on
# Debian 12, with apt-get. Idempotent: when every package is present it only
# checks and returns.
set -euo pipefail

PACKAGES=(
  cmake g++ make git ca-certificates curl unzip
  libtorch-dev python3-torch      # LibTorch 1.13 and the same torch for exporting fixtures
  libopenblas0-pthread            # without it a matmul is ~20x slower (reference BLAS)
  libfmt-dev libgtest-dev libgmock-dev nlohmann-json3-dev libbenchmark-dev libcli11-dev
  libicu-dev                      # NFKC for the USE-Lite tokenizer
  libcpp-httplib-dev              # HTTP for peft-serve
  libgloo-dev                     # headers of Gloo, the c10d backend peft::distributed uses
  clang libclang-rt-14-dev        # libFuzzer and clang's sanitizer runtimes (fuzz/, scripts/hardening.sh)
  doxygen                         # the API reference (cmake --build build --target docs)
  gnuplot-nox                     # peft-finetune's loss.png
)
# npm fetches the pinned model and data packages; any npm will do (the machine's own counts).
command -v npm > /dev/null || PACKAGES+=(npm)

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#PACKAGES[@]} packages already installed"
  exit 0
fi

. /etc/os-release 2>/dev/null || true
if [ "${ID:-}" != "debian" ] || [ "${VERSION_ID:-}" != "12" ]; then
  echo "setup: this script supports Debian 12 only (found ${PRETTY_NAME:-an unknown system})." >&2
  echo "setup: install these by hand (LibTorch 1.13+, fmt, GoogleTest, nlohmann-json, CLI11, OpenBLAS): ${missing[*]}" >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "setup: missing packages: ${missing[*]}" >&2
  echo "setup: run as root, or: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi

echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"

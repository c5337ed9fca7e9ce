#!/usr/bin/env bash
# Run the Dockerfile's build steps without a Docker engine (for CI): the
# builder stage's wheel build (with the Cython extension required) in a fresh
# virtual environment, then the runtime stage's offline install of those
# wheels into another fresh one, its import check and the `proxyd --version`
# smoke test, and a check that the runtime stage's system tools are present.
# Keep the package lists in step with Dockerfile (tests/api/test_deploy.py
# compares them). Usage: scripts/docker-steps.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."

BUILDER_PACKAGES=(gcc libc6-dev)
RUNTIME_PACKAGES=(iptables nftables libnftables1 ipset conntrack kmod iproute2)
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3

work=${1:-$(mktemp -d /tmp/proxyd-docker-steps.XXXXXX)}
cleanup() { [ -n "${1:-}" ] || rm -rf "$work"; }
trap 'cleanup "${1:-}"' EXIT
mkdir -p "$work/src"

missing=()
for pkg in "${BUILDER_PACKAGES[@]}" "${RUNTIME_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "docker-steps: missing packages ${missing[*]} (run as root to install)" >&2
    exit 1
  fi
fi

echo "--- builder: the build context (what .dockerignore lets through and the Dockerfile copies)"
cp pyproject.toml setup.py README.md constraints.txt "$work/src/"
cp -r native proxyd "$work/src/"
find "$work/src" \( -name __pycache__ -o -name '*.so' -o -name '*.py[cod]' \) -prune -exec rm -rf {} +
rm -f "$work/src/native/"*.c "$work/src/native/"*.html

echo "--- builder: pip wheel (extension required)"
"$python" -m venv "$work/builder"
(
  cd "$work/src"
  export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
  export PROXYD_REQUIRE_EXTENSIONS=1 PIP_CONSTRAINT="$work/src/constraints.txt"
  "$work/builder/bin/pip" wheel -q --wheel-dir "$work/wheels" .
)
ls "$work"/wheels/proxyd-*.whl

echo "--- runtime: offline install from the wheels"
"$python" -m venv "$work/runtime"
PIP_DISABLE_PIP_VERSION_CHECK=1 "$work/runtime/bin/pip" install -q --no-index --find-links "$work/wheels" \
  "$work"/wheels/proxyd-*.whl
(
  cd /  # import the installed package, not the source tree
  "$work/runtime/bin/python" -c "import proxyd.modes.userspace.conntable as c; assert c.NATIVE, 'native conntable missing'"
  "$work/runtime/bin/proxyd" --version
)

echo "--- runtime: system tools"
for tool in iptables-legacy iptables-nft ip6tables-legacy ip6tables-nft nft ipset conntrack modprobe ip; do
  command -v "$tool" >/dev/null || { echo "docker-steps: $tool missing" >&2; exit 1; }
done
echo "docker-steps: OK"

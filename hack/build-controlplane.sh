#!/usr/bin/env bash
# Build a real Kubernetes control plane (etcd, kube-apiserver,
# kube-controller-manager) from Go modules, for Sidegate's integration tests.
#
# The binaries go to
#   ${SIDEGATE_CACHE:-$HOME/.cache/sidegate}/controlplane/<k8s-version>/bin/
# and the build is skipped when they are all there already. The last line
# printed on stdout is that bin directory.
#
# Needs only Go (go.mod's version or newer) and the Go module proxy. Measured on
# a 2-core machine with empty Go module and build caches: 9m43s in all
# (etcd 99s, kube-apiserver 373s, kube-controller-manager 96s, the rest module
# downloads); about 2.8 GB of Go build cache and 0.6 GB of modules.
#
# Environment:
#   SIDEGATE_CACHE        cache root (default: $HOME/.cache/sidegate)
#   GO                    go binary (default: go on PATH, else /usr/local/go/bin/go)
#   BUILD_JOBS            go build -p value (default: number of CPUs)
#   FORCE=1               rebuild even when the binaries exist
#
# Usage: hack/build-controlplane.sh [--print-dir]
#   --print-dir   only print the bin directory (no build)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
moddir="${here}/controlplane"

go_bin="${GO:-}"
if [[ -z "${go_bin}" ]]; then
  if command -v go >/dev/null 2>&1; then
    go_bin="$(command -v go)"
  elif [[ -x /usr/local/go/bin/go ]]; then
    go_bin=/usr/local/go/bin/go
  else
    echo "build-controlplane: no Go toolchain found (set GO=/path/to/go)" >&2
    exit 1
  fi
fi

# The Kubernetes version is whatever hack/controlplane/go.mod requires.
k8s_version="$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" { print $3 } $1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2 }' "${moddir}/go.mod" | head -n 1)"
if [[ -z "${k8s_version}" ]]; then
  echo "build-controlplane: cannot find the k8s.io/kubernetes version in ${moddir}/go.mod" >&2
  exit 1
fi

cache_root="${SIDEGATE_CACHE:-${HOME}/.cache/sidegate}"
bindir="${cache_root}/controlplane/${k8s_version}/bin"
binaries=(etcd kube-apiserver kube-controller-manager)

if [[ "${1:-}" == "--print-dir" ]]; then
  echo "${bindir}"
  exit 0
fi

all_present() {
  local b
  for b in "${binaries[@]}"; do
    [[ -x "${bindir}/${b}" ]] || return 1
  done
  return 0
}

if [[ "${FORCE:-0}" != "1" ]] && all_present; then
  echo "build-controlplane: ${k8s_version} binaries already in ${bindir}" >&2
  echo "${bindir}"
  exit 0
fi

mkdir -p "${bindir}"
# Build into a scratch directory next to the target, then move into place, so
# an interrupted build never leaves a half-written binary that looks complete.
tmpdir="$(mktemp -d "${bindir}/.build.XXXXXX")"
trap 'rm -rf "${tmpdir}"' EXIT

jobs="${BUILD_JOBS:-$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)}"
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
# go.mod and go.sum are tidy and complete: build exactly what they pin.
export GOFLAGS="${GOFLAGS:+${GOFLAGS} }-mod=readonly"
export CGO_ENABLED="${CGO_ENABLED:-0}"

echo "build-controlplane: building Kubernetes ${k8s_version} control plane into ${bindir} (go build -p ${jobs})" >&2
start="$(date +%s)"
(
  cd "${moddir}"
  "${go_bin}" version >&2
  "${go_bin}" mod download >&2
  # Stamp the Kubernetes version the way upstream's hack/lib/version.sh does, so
  # /version reports it instead of v0.0.0-master.
  minor="${k8s_version#v1.}"
  minor="${minor%%.*}"
  version_ldflags=""
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    version_ldflags+=" -X ${pkg}.gitVersion=${k8s_version} -X ${pkg}.gitMajor=1"
    version_ldflags+=" -X ${pkg}.gitMinor=${minor} -X ${pkg}.gitTreeState=clean"
  done
  for b in "${binaries[@]}"; do
    b_start="$(date +%s)"
    ldflags="-s -w"
    [[ "${b}" == etcd ]] || ldflags+="${version_ldflags}"
    "${go_bin}" build -p "${jobs}" -trimpath -ldflags "${ldflags}" \
      -o "${tmpdir}/${b}" "./cmd/${b}"
    echo "build-controlplane: built ${b} in $(( $(date +%s) - b_start ))s" >&2
  done
)
for b in "${binaries[@]}"; do
  mv -f "${tmpdir}/${b}" "${bindir}/${b}"
done
echo "build-controlplane: done in $(( $(date +%s) - start ))s" >&2
ls -l "${bindir}" >&2
echo "${bindir}"

#!/usr/bin/env bash
# Build kustomize from its Go module, for tests/test_manifests.py and users without it.
#
# The binary goes to ${SIDEGATE_CACHE:-$HOME/.cache/sidegate}/bin/kustomize-<version> (the
# version in the name, so a version bump here rebuilds) and is skipped when it is there. The
# last line printed on stdout is the binary's path. Needs only Go and the Go module proxy; about
# a minute on 2 cores with empty caches.
#
# Environment:
#   SIDEGATE_CACHE      cache root (default: $HOME/.cache/sidegate)
#   GO                  go binary (default: go on PATH, else /usr/local/go/bin/go)
#   KUSTOMIZE_VERSION   default below
set -euo pipefail

version="${KUSTOMIZE_VERSION:-v5.8.1}"
cache_root="${SIDEGATE_CACHE:-${HOME}/.cache/sidegate}"
bindir="${cache_root}/bin"
target="${bindir}/kustomize-${version}"

if [[ -x "${target}" ]]; then
  echo "${target}"
  exit 0
fi

go_bin="${GO:-}"
if [[ -z "${go_bin}" ]]; then
  if command -v go >/dev/null 2>&1; then
    go_bin="$(command -v go)"
  elif [[ -x /usr/local/go/bin/go ]]; then
    go_bin=/usr/local/go/bin/go
  else
    echo "install-kustomize: no Go toolchain found (set GO=/path/to/go)" >&2
    exit 1
  fi
fi

mkdir -p "${bindir}"
work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT
echo "install-kustomize: building sigs.k8s.io/kustomize/kustomize/v5@${version}" >&2
GOBIN="${work}" GOFLAGS=-buildvcs=false "${go_bin}" install "sigs.k8s.io/kustomize/kustomize/v5@${version}"
mv "${work}/kustomize" "${target}"
echo "${target}"

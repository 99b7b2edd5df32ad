#!/usr/bin/env bash
# End to end in a kind cluster: build the image, install Sidegate (manifests/), run PostgreSQL and
# a workload with the injected sidecar (manifests/overlays/e2e-kind), then check through psql in
# the workload what tests/e2e_expectations.json expects: masking, a blocked DROP, a held DELETE
# approved with `kubectl sidegate approve`, and the audit trail in the sidecar's log (hash chain
# checked with `sidegate audit verify`). tests/test_e2e_expectations.py runs the same expectations
# against a local PostgreSQL.
#
# Needs docker, kind, kubectl and the project virtualenv (make venv: python, the kubectl-sidegate
# plugin and sidegate). Usage: hack/e2e-kind.sh   (or: make e2e-kind)
# Environment: CLUSTER (default sidegate-e2e), KEEP=1 to keep the cluster afterwards.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cluster="${CLUSTER:-sidegate-e2e}"
export PATH="${root}/.venv/bin:${PATH}"
expect=(python "${root}/tests/e2e_expectations.py")
ns=payments
work="$(mktemp -d)"

cleanup() {
  rm -rf "${work}"
  if [[ "${KEEP:-0}" != 1 ]]; then kind delete cluster --name "${cluster}" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*" >&2; }
fail() { echo "FAIL: $*" >&2; exit 1; }
for tool in docker kind kubectl python kubectl-sidegate sidegate; do
  command -v "${tool}" >/dev/null || fail "${tool} not found (make venv puts python and the plugins in .venv/bin)"
done

kustomize() { kubectl kustomize "$@"; }
image="$(kustomize "${root}/manifests" | sed -n 's/^ *image: *\(ghcr.io\/sidegate\/[^ ]*\)$/\1/p' | head -n 1)"
[[ -n "${image}" ]] || fail "no sidegate image in manifests/"

step "kind cluster ${cluster}, image ${image}"
kind get clusters | grep -qx "${cluster}" || kind create cluster --name "${cluster}" --wait 120s
kubectl config use-context "kind-${cluster}"
docker build -t "${image}" "${root}"
kind load docker-image "${image}" --name "${cluster}"

step "install Sidegate"
kubectl apply --server-side -k "${root}/manifests/crds"
kubectl wait --for condition=Established crd -l app.kubernetes.io/name=sidegate --timeout 60s
kubectl apply --server-side -k "${root}/manifests"
"${root}/hack/webhook-certs.sh"
kubectl -n sidegate-system rollout status deploy/sidegate-operator --timeout 180s

step "PostgreSQL and the workload"
kubectl create namespace "${ns}" --dry-run=client -o yaml | kubectl apply -f -
python -c 'from sidegate_proxy.localpg import SAMPLE_SCHEMA; print(SAMPLE_SCHEMA)' >"${work}/seed.sql"
kubectl -n "${ns}" create configmap orders-db-seed --from-file=seed.sql="${work}/seed.sql" \
  --dry-run=client -o yaml | kubectl apply -f -
kubectl get --raw /openid/v1/jwks >"${work}/jwks.json"
kubectl -n "${ns}" create secret generic cluster-jwks --from-file=jwks.json="${work}/jwks.json" \
  --dry-run=client -o yaml | kubectl apply -f -
kubectl apply --server-side -k "${root}/manifests/overlays/e2e-kind"
kubectl -n "${ns}" rollout status deploy/orders-db --timeout 180s
kubectl -n "${ns}" wait --for condition=Ready sgconn/orders-db --timeout 120s
kubectl -n "${ns}" rollout status deploy/orders-api --timeout 180s
pod="$(kubectl -n "${ns}" get pod -l app=orders-api -o jsonpath='{.items[0].metadata.name}')"
kubectl -n "${ns}" get pod "${pod}" -o jsonpath='{.spec.initContainers[*].name}' | grep -qw sidegate-proxy \
  || fail "pod ${pod} has no injected sidegate-proxy sidecar"

mapfile -t psql_args < <("${expect[@]}" psql-args)
run_case() {  # run_case NAME: psql in the workload's app container; output to ${work}/NAME.out
  local sql code=0
  sql="$("${expect[@]}" sql "$1")"
  kubectl -n "${ns}" exec "${pod}" -c app -- psql "${psql_args[@]}" -c "${sql}" >"${work}/$1.out" 2>&1 || code=$?
  echo "${code}" >"${work}/$1.code"
}
check_case() {
  "${expect[@]}" check-output "$1" "$(cat "${work}/$1.code")" "${work}/$1.out" || fail "case $1"
  echo "ok: $1" >&2
}

step "masking and guardrails"
while read -r name; do
  run_case "${name}"
  check_case "${name}"
done < <("${expect[@]}" cases --no-approve)

step "held statements, approved with kubectl sidegate"
reviewer=kubernetes-admin
while read -r name; do
  run_case "${name}" &
  held=$!
  request=""
  for _ in $(seq 1 60); do
    request="$(kubectl sidegate pending -n "${ns}" | awk 'NR > 1 { print $2; exit }')"
    [[ -n "${request}" ]] && break
    sleep 1
  done
  [[ -n "${request}" ]] || fail "case ${name}: no pending AccessRequest"
  kubectl sidegate approve "${request}" -n "${ns}" --comment "e2e ${name}"
  wait "${held}" || true
  check_case "${name}"
  kubectl -n "${ns}" get sgar "${request}" -o jsonpath='{.status.phase}{"\n"}' >&2
done < <("${expect[@]}" cases --approve)

step "audit trail (sidecar log) and its hash chain"
sleep 2  # the stdout sink ships after the spool's group commit
kubectl -n "${ns}" logs "${pod}" -c sidegate-proxy >"${work}/sidecar.log"
grep '^{' "${work}/sidecar.log" >"${work}/audit.jsonl" || fail "no audit events in the sidecar log"
"${expect[@]}" check-audit "${work}/audit.jsonl" --reviewer "${reviewer}" || fail "audit trail"
sidegate audit verify "${work}/audit.jsonl"
kubectl -n "${ns}" get events --field-selector involvedObject.kind=Connection

echo "e2e-kind: all expectations met" >&2

#!/usr/bin/env bash
# Webhook TLS without cert-manager: make a private CA and a serving certificate for the operator's
# webhook Service with openssl, store them in Secret sidegate-system/sidegate-operator-webhook-tls
# (which the operator mounts), and put the CA in the caBundle of both webhook configurations.
#
# Run it after `kubectl apply -k manifests/` (the webhook configurations must exist). It is
# idempotent: an existing Secret is reused (only the caBundles are refreshed) unless --renew is
# given. The certificate lasts DAYS days (default 365): run it with --renew before then, and
# restart the operator (kubectl -n sidegate-system rollout restart deploy/sidegate-operator).
# With cert-manager, use manifests/cert-manager instead.
#
# Usage: hack/webhook-certs.sh [--renew]
# Environment: KUBECTL (default kubectl), NAMESPACE (sidegate-system), DAYS (365)
set -euo pipefail

kubectl="${KUBECTL:-kubectl}"
namespace="${NAMESPACE:-sidegate-system}"
days="${DAYS:-365}"
service=sidegate-operator-webhook
secret=sidegate-operator-webhook-tls
webhooks=(mutatingwebhookconfiguration/sidegate-inject validatingwebhookconfiguration/sidegate-accessrequest-review)

renew=false
case "${1:-}" in
  --renew) renew=true ;;
  "") ;;
  *) echo "usage: $0 [--renew]" >&2; exit 2 ;;
esac

work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT

if ! ${renew} && "${kubectl}" -n "${namespace}" get secret "${secret}" >/dev/null 2>&1; then
  echo "webhook-certs: reusing Secret ${namespace}/${secret}" >&2
  "${kubectl}" -n "${namespace}" get secret "${secret}" -o 'jsonpath={.data.ca\.crt}' | base64 -d >"${work}/ca.crt"
else
  echo "webhook-certs: making a CA and a certificate for ${service}.${namespace}.svc" >&2
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days "$((days * 10))" \
    -subj "/CN=sidegate-webhook-ca" -keyout "${work}/ca.key" -out "${work}/ca.crt" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=${service}.${namespace}.svc" -keyout "${work}/tls.key" -out "${work}/tls.csr" 2>/dev/null
  printf 'subjectAltName=DNS:%s.%s.svc,DNS:%s.%s.svc.cluster.local\nextendedKeyUsage=serverAuth\n' \
    "${service}" "${namespace}" "${service}" "${namespace}" >"${work}/ext.cnf"
  openssl x509 -req -in "${work}/tls.csr" -CA "${work}/ca.crt" -CAkey "${work}/ca.key" -CAcreateserial \
    -days "${days}" -extfile "${work}/ext.cnf" -out "${work}/tls.crt" 2>/dev/null
  "${kubectl}" -n "${namespace}" create secret generic "${secret}" --type kubernetes.io/tls \
    --from-file=tls.crt="${work}/tls.crt" --from-file=tls.key="${work}/tls.key" \
    --from-file=ca.crt="${work}/ca.crt" --dry-run=client -o yaml | "${kubectl}" apply -f -
fi

bundle="$(base64 -w0 <"${work}/ca.crt")"
for webhook in "${webhooks[@]}"; do
  "${kubectl}" patch "${webhook}" --type json \
    -p "[{\"op\": \"add\", \"path\": \"/webhooks/0/clientConfig/caBundle\", \"value\": \"${bundle}\"}]"
done

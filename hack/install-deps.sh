#!/usr/bin/env bash
# Installs the Debian packages the test suite and benchmarks run for real, only when missing.
set -euo pipefail
need=()
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
[[ -n "$pg_bin" && -x "$pg_bin/initdb" ]] || need+=(postgresql postgresql-contrib)
command -v psql >/dev/null || need+=(postgresql-client)
command -v pgbench >/dev/null || [[ -n "$pg_bin" && -x "$pg_bin/pgbench" ]] || need+=(postgresql-contrib)
command -v pgbouncer >/dev/null || need+=(pgbouncer)
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || need+=(nginx-light)
if ((${#need[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "missing Debian packages: ${need[*]} (run as root or install them)" >&2
    exit 1
  fi
  echo "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # Debian starts the services it installs; the tests run their own throwaway servers.
  for svc in postgresql pgbouncer nginx; do
    service "$svc" stop >/dev/null 2>&1 || true
  done
fi

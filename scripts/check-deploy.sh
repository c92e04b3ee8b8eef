#!/usr/bin/env bash
# Checks the deploy files offline, without Docker or a cluster:
#   - hadolint on every Dockerfile under deploy/docker (any finding fails,
#     style and info included);
#   - every overlay under deploy/k8s/overlays renders with `kubectl kustomize`;
#   - every rendered object, and every *.example.yaml, validates against the
#     Kubernetes JSON schemas of one pinned version in strict mode, with the
#     operators' custom resources listed as skipped (deploy/k8s/tools/validate.py);
#   - yamllint --strict on deploy/k8s and deploy/grafana (deploy/k8s/.yamllint.yaml).
# The tools are pinned in deploy/k8s/tools/requirements.txt and installed
# into .venv-deploy, refreshed when that file changes. Prints a table of what
# it checked and exits non-zero when anything failed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

KUBERNETES_VERSION=1.32.0
VENV=.venv-deploy
REQUIREMENTS=deploy/k8s/tools/requirements.txt

# The tools, installed once and again when the pinned versions change.
scripts/tool-venv.sh "$VENV" "$REQUIREMENTS"
if ! command -v kubectl >/dev/null 2>&1; then
  echo "check-deploy: kubectl (with kustomize v5) is needed to render the overlays" >&2
  exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
rows=()
failed=0
row() { rows+=("$(printf '%-10s %-52s %-6s %s' "$1" "$2" "$3" "$4")"); [ "$3" = ok ] || failed=1; }

echo "== hadolint $("$VENV/bin/hadolint" --version | awk '{print $NF}')"
for dockerfile in deploy/docker/*Dockerfile; do
  if out="$("$VENV/bin/hadolint" --failure-threshold info "$dockerfile" 2>&1)"; then
    row hadolint "$dockerfile" ok "no findings"
  else
    echo "$out"
    row hadolint "$dockerfile" FAIL "$(printf '%s\n' "$out" | grep -c . || true) findings"
  fi
done

echo "== kubectl kustomize, then validate against Kubernetes $KUBERNETES_VERSION"
manifests=()
total_validated=0
total_skipped=0
for overlay in deploy/k8s/overlays/*/; do
  overlay="${overlay%/}"
  out="$work/$(basename "$overlay").yaml"
  # The monitoring component reads deploy/grafana/ptune.json, outside its folder.
  if kubectl kustomize "$overlay" > "$out" 2> "$work/err"; then
    row render "$overlay" ok "$(grep -c '^kind:' "$out") objects"
    manifests+=("$overlay=$out")
  else
    cat "$work/err"
    row render "$overlay" FAIL "kubectl kustomize failed"
  fi
done
for example in deploy/k8s/overlays/*/*.example.yaml; do
  [ -e "$example" ] && manifests+=("$example=$example")
done
for entry in "${manifests[@]}"; do
  name="${entry%%=*}"
  file="${entry#*=}"
  echo "-- $name"
  status=0
  "$VENV/bin/python" deploy/k8s/tools/validate.py --kubernetes-version "$KUBERNETES_VERSION" "$file" > "$work/validate" || status=$?
  grep -v '^summary ' "$work/validate" || true
  summary="$(grep '^summary ' "$work/validate" || true)"
  field() { printf '%s\n' "$summary" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
  count="$(field validated)"; total_validated=$((total_validated + ${count:-0}))
  count="$(field skipped)"; total_skipped=$((total_skipped + ${count:-0}))
  if [ "$status" -eq 0 ] && [ -n "$summary" ]; then
    detail="$(field validated) validated, $(field skipped) CRDs skipped"
    [ "$(field skipped)" = 0 ] || detail="$detail ($(field skipped_kinds))"
    row validate "$name" ok "$detail"
  else
    row validate "$name" FAIL "${summary:+$(field failed) failed of $(field objects)}${summary:-the validator stopped}"
  fi
done

echo "== yamllint $("$VENV/bin/yamllint" --version | awk '{print $NF}')"
if out="$("$VENV/bin/yamllint" --strict -c deploy/k8s/.yamllint.yaml deploy/k8s deploy/grafana 2>&1)"; then
  row yamllint deploy/k8s ok "$(find deploy/k8s deploy/grafana -name '*.yaml' | wc -l) files"
else
  echo "$out"
  row yamllint deploy/k8s FAIL "$(printf '%s\n' "$out" | grep -cE '(error|warning)' || true) problems"
fi

echo
printf '%-10s %-52s %-6s %s\n' check target result detail
printf '%s\n' "${rows[@]}"
echo "objects: $total_validated validated against the Kubernetes $KUBERNETES_VERSION schemas (strict), $total_skipped skipped as custom resources"
if [ "$failed" -ne 0 ]; then
  echo "check-deploy: FAILED" >&2
  exit 1
fi
echo "check-deploy: all checks passed"

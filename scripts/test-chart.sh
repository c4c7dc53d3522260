#!/usr/bin/env bash
# The Helm chart's test: render and lint deploy/helm/pdserve with Helm's Go SDK (helm-python-sdk
# bundles it, no helm binary), then validate every manifest (kubernetes-validate --strict; the
# KEDA and prometheus-operator CRD kinds against cloudcoil's models of their CRDs).
# Installs what it needs into .venv, idempotently. No cluster and no network beyond PyPI.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
pins=(
  helm-python-sdk==0.2.2
  kubernetes-validate==1.37.0
  cloudcoil==0.6.0
  cloudcoil-models-keda==2.16.1.0
  cloudcoil-models-prometheus-operator==0.80.1.0
)
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python - "${pins[@]}" <<'PY' 2>/dev/null; then
import sys
from importlib.metadata import version
sys.exit(any(version(name) != want for name, want in (p.split("==") for p in sys.argv[1:])))
PY
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "${pins[@]}"
fi
exec .venv/bin/python deploy/helm/test_chart.py

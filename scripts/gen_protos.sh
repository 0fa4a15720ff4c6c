#!/usr/bin/env bash
# Regenerates the Python code for protos/**/*.proto, in place (absolute imports
# rooted at the repository, e.g. `from protos.relay.v1 import relay_pb2`).
# `scripts/gen_protos.sh --check` fails if the committed code is stale.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
out=.
if [[ "${1:-}" == "--check" ]]; then
  out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
fi
mapfile -t protos < <(find protos -name '*.proto' | sort)
"$PY" -m grpc_tools.protoc -I. --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" "${protos[@]}"
if [[ "${1:-}" == "--check" ]]; then
  stale=0
  for p in "${protos[@]}"; do
    base=${p%.proto}
    for suffix in _pb2.py _pb2.pyi _pb2_grpc.py; do
      if ! cmp -s "$out/$base$suffix" "$base$suffix"; then
        echo "stale generated code: $base$suffix (run scripts/gen_protos.sh)" >&2; stale=1
      fi
    done
  done
  exit $stale
fi

#!/usr/bin/env bash
# Regenerates the Python gRPC code and type stubs from proto/. The only way generated code is made.
# With --check, generates into a temporary tree and fails if the checked-in code differs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=shadowplane
if [ "${1:-}" = "--check" ]; then
  out=$(mktemp -d)/shadowplane
  trap 'rm -rf "$(dirname "$out")"' EXIT
fi
mkdir -p "$out/v1"
rm -f "$out"/v1/*_pb2*.py "$out"/v1/*_pb2*.pyi
"$PY" -m grpc_tools.protoc -Iproto \
  --python_out="$(dirname "$out")" --grpc_python_out="$(dirname "$out")" \
  --mypy_out="$(dirname "$out")" --mypy_grpc_out="$(dirname "$out")" \
  --plugin=protoc-gen-mypy="$(dirname "$PY")/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$(dirname "$PY")/protoc-gen-mypy_grpc" \
  proto/shadowplane/v1/*.proto
touch "$out/v1/__init__.py"
if [ "${1:-}" = "--check" ]; then
  if ! diff -r -q -x __pycache__ "$out/v1" shadowplane/v1 >/dev/null; then
    echo "generated code in shadowplane/v1 is stale: run 'make proto' and commit the result" >&2
    diff -r -q -x __pycache__ "$out/v1" shadowplane/v1 >&2 || true
    exit 1
  fi
  echo "generated code is up to date"
fi

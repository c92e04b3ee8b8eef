#!/usr/bin/env bash
# Checks the worker binary a GPU image ships: built with the `cuda` feature
# against the pinned (CUDA) torch wheel, it must list libtorch_cuda.so among
# its needed libraries (else libtorch never registers its CUDA kernels), and
# find libtorch through a path that survives copying it: the binary is
# copied into a bin/ folder beside a lib/ folder holding the wheel's
# libraries, as deploy/docker/worker.Dockerfile lays them out, and must
# resolve libtorch there and start with an empty environment.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$PTUNE_ROOT"

profile=${PTUNE_CHECK_PROFILE:-dev}
out=$([ "$profile" = dev ] && echo debug || echo "$profile")
cargo build --profile "$profile" -p ptune-worker --features cuda --bin ptune-worker
binary="target/$out/ptune-worker"

fail() {
  echo "check-worker-binary: FAILED: $*" >&2
  exit 1
}

needed=$(readelf -d "$binary" | awk '/NEEDED/ {print $NF}' | tr -d '[]')
runpath=$(readelf -d "$binary" | awk '/RUNPATH/ {print $NF}' | tr -d '[]')
grep -qx libtorch_cuda.so <<<"$needed" || fail "libtorch_cuda.so is not a needed library of $binary: $(echo $needed)"
case "$runpath" in
  '$ORIGIN/../torch/lib:'*) ;;
  *) fail "RUNPATH of $binary does not start with \$ORIGIN/../torch/lib: $runpath" ;;
esac

image=$(mktemp -d)
trap 'rm -rf "$image"' EXIT
mkdir -p "$image/bin" "$image/torch/lib"
cp "$binary" "$image/bin/"
for lib in "$TORCH_LIB"/*.so*; do ln -s "$lib" "$image/torch/lib/"; done
ln -s "$TORCH_LIB/../../nvidia" "$image/nvidia"
env -i "$image/bin/ptune-worker" --help >/dev/null || fail "a copied binary does not start with an empty environment"
resolved=$(env -i ldd "$image/bin/ptune-worker" | awk '/libtorch_cpu.so/ {print $3}')
[ "$(realpath -s "$resolved")" = "$image/torch/lib/libtorch_cpu.so" ] \
  || fail "a copied binary resolves libtorch_cpu.so to ${resolved:-nothing}, not its own torch/lib"

printf '%-40s %s\n' "check" "result" \
  "libtorch_cuda.so needed" "yes" \
  "RUNPATH" "$runpath" \
  "copied binary starts, env -i" "yes (libtorch_cpu.so from \$ORIGIN/../torch/lib)"

#!/usr/bin/env bash
# Vendor the WASM CPU build of onnxruntime-web for the demo page (service/static/).
#
#   scripts/vendor-onnxruntime-web.sh           fetch the pinned version from the npm registry
#                                               (npm pack), check the tarball, write the files
#   scripts/vendor-onnxruntime-web.sh --check   check the vendored files against SHA256SUMS (offline)
#
# Only the files the WASM CPU backend needs are kept: the ort.wasm.min.js bundle (the
# `ort` global), the Emscripten loader it imports (.mjs) and its WebAssembly binary. The
# binary is the SIMD + threads build; served without cross-origin isolation it runs on one
# thread, which is what the page asks for (ort.env.wasm.numThreads = 1).
set -euo pipefail

VERSION=1.30.0
# `npm view onnxruntime-web@1.30.0 dist.integrity`: the tarball is refused unless it matches.
INTEGRITY=sha512-q0y+JrrtukXSzsBWEMccVfqX25LRmosXHF+CaRJmg8pZClzcV7svNc4rKY3jL02Vb7QmRMDs1SigqR4CXAfKYQ==
FILES=(ort.wasm.min.js ort-wasm-simd-threaded.mjs ort-wasm-simd-threaded.wasm)

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/service/static/vendor/onnxruntime-web"

check() {
  [ -f "$DEST/SHA256SUMS" ] || { echo "vendor-onnxruntime-web: $DEST/SHA256SUMS missing; run $0" >&2; return 1; }
  grep -q "^# onnxruntime-web $VERSION\$" "$DEST/SHA256SUMS" ||
    { echo "vendor-onnxruntime-web: vendored files are not version $VERSION; run $0" >&2; return 1; }
  (cd "$DEST" && grep -v '^#' SHA256SUMS | sha256sum --check --strict --quiet -)
}

if [ "${1:-}" = "--check" ]; then
  check && echo "vendor-onnxruntime-web: $VERSION OK"
  exit
fi

command -v npm >/dev/null || { echo "vendor-onnxruntime-web: npm is needed (Debian package npm)" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

(cd "$tmp" && npm pack --silent "onnxruntime-web@$VERSION" >/dev/null)
tarball="$tmp/onnxruntime-web-$VERSION.tgz"
[ -f "$tarball" ] || { echo "vendor-onnxruntime-web: npm pack wrote no $tarball" >&2; exit 1; }
actual="$(node -e 'const f = require("fs"), c = require("crypto");
  console.log("sha512-" + c.createHash("sha512").update(f.readFileSync(process.argv[1])).digest("base64"))' "$tarball")"
if [ "$actual" != "$INTEGRITY" ]; then
  echo "vendor-onnxruntime-web: tarball integrity $actual, expected $INTEGRITY" >&2
  exit 1
fi

members=()
for f in "${FILES[@]}"; do members+=("package/dist/$f"); done
tar -xzf "$tarball" -C "$tmp" "${members[@]}" package/package.json
grep -q "\"version\": \"$VERSION\"" "$tmp/package/package.json"
grep -q '"license": "MIT"' "$tmp/package/package.json"

rm -rf "$DEST"
mkdir -p "$DEST"
for f in "${FILES[@]}"; do install -m 0644 "$tmp/package/dist/$f" "$DEST/$f"; done
{
  echo "# onnxruntime-web $VERSION"
  echo "# npm tarball $INTEGRITY"
  echo "# MIT licence (c) Microsoft Corporation; https://www.npmjs.com/package/onnxruntime-web"
  (cd "$DEST" && sha256sum "${FILES[@]}")
} > "$DEST/SHA256SUMS"
check
total=$(cd "$DEST" && du -cb "${FILES[@]}" | tail -1 | cut -f1)
echo "vendor-onnxruntime-web: onnxruntime-web $VERSION in $DEST ($total bytes)"

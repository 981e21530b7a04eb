#!/usr/bin/env bash
# Builds the container images with podman, with no registry and no index during the build:
#   1. the base image: Debian bookworm (python3 3.11, its venv module, CA certificates) made by
#      mmdebstrap from Debian's packages and imported into podman; skipped when it exists;
#   2. the wheelhouses wheelhouse/serve/ and wheelhouse/train/: the wheel of every package of
#      requirements.lock that `.[serve]` resp. `.[train]` needs (scripts/lock.py select: the
#      versions the tests run, hash-checked), downloaded on this host for the image's platform
#      (CPython 3.11, glibc 2.36, this architecture), with requirements.txt (exact version and
#      sha256 of each wheel) and constraints.txt; torch is the CPU build. Kept while that part of
#      the lock and the target are unchanged: the key is their sha256;
#   3. the images instanas-api (docker/service.Dockerfile) and instanas-train
#      (docker/training.Dockerfile), FROM that base, installing from the wheelhouse only.
#
# Usage: scripts/build-images.sh [--wheels-only] [api] [train]      (no names: both images)
#
# Environment (defaults in brackets):
#   PYTHON                     Python whose pip downloads the wheelhouse [.venv/bin/python, else python3]
#   INSTANAS_BASE_IMAGE        [localhost/instanas-base:bookworm]; a name outside localhost/ is
#                              pulled by podman instead (python:3.11-slim-bookworm works too)
#   INSTANAS_DEBIAN_MIRROR     [http://deb.debian.org/debian]
#   INSTANAS_DEBIAN_SECURITY   [http://deb.debian.org/debian-security]
#   INSTANAS_TORCH_INDEX       where torch's CPU build is [https://download.pytorch.org/whl/cpu];
#                              empty: only pip's own configuration (index, find-links)
#   INSTANAS_API_IMAGE         [localhost/instanas-api:latest]
#   INSTANAS_TRAIN_IMAGE       [localhost/instanas-train:latest]
#   INSTANAS_PODMAN            [podman --runtime runc --cgroup-manager cgroupfs]
#   CONTAINERS_CONF            when unset, .cache/podman/containers.conf (`default_ulimits = []`:
#                              podman's default nofile limit cannot be set on every machine)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '%s build-images: %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

wheels_only=0
targets=()
for arg in "$@"; do
  case $arg in
    --wheels-only) wheels_only=1 ;;
    api | train) targets+=("$arg") ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $arg (try --help)" ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(api train)

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
BASE_IMAGE=${INSTANAS_BASE_IMAGE:-localhost/instanas-base:bookworm}
MIRROR=${INSTANAS_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY=${INSTANAS_DEBIAN_SECURITY:-http://deb.debian.org/debian-security}
TORCH_INDEX=${INSTANAS_TORCH_INDEX-https://download.pytorch.org/whl/cpu}
read -r -a PODMAN <<<"${INSTANAS_PODMAN:-podman --runtime runc --cgroup-manager cgroupfs}"
declare -A IMAGE=([api]=${INSTANAS_API_IMAGE:-localhost/instanas-api:latest}
                  [train]=${INSTANAS_TRAIN_IMAGE:-localhost/instanas-train:latest})
declare -A DOCKERFILE=([api]=docker/service.Dockerfile [train]=docker/training.Dockerfile)
declare -A EXTRA=([api]=serve [train]=train)

# The image's Python: bookworm's python3 and python:3.11-slim-bookworm are both CPython 3.11 on
# glibc 2.36, so wheels are chosen for that, whatever this host runs.
SUITE=bookworm PY_VERSION=3.11 GLIBC_MINOR=36
ARCH=$(uname -m)
case $ARCH in x86_64 | aarch64) ;; *) die "unsupported architecture $ARCH" ;; esac
PLATFORMS=()
for ((minor = GLIBC_MINOR; minor >= 17; minor--)); do PLATFORMS+=(--platform "manylinux_2_${minor}_${ARCH}"); done
PLATFORMS+=(--platform "manylinux2014_${ARCH}")
if [ "$ARCH" = x86_64 ]; then
  for ((minor = 16; minor >= 5; minor--)); do PLATFORMS+=(--platform "manylinux_2_${minor}_${ARCH}"); done
  PLATFORMS+=(--platform manylinux2010_x86_64 --platform manylinux1_x86_64)
fi

mkdir -p .cache wheelhouse
# One build at a time on this machine (test sessions may run side by side).
exec 9>.cache/build-images.lock
flock 9

# --- 2. wheelhouses -------------------------------------------------------------------------

# sha256 of what decides a wheelhouse's contents: the lock's part for the extra, the target.
wheelhouse_key() {
  { "$PYTHON" scripts/lock.py select "$1"; echo "format 2 $PY_VERSION $GLIBC_MINOR $ARCH $TORCH_INDEX"; } |
    sha256sum | cut -c1-16
}

# requirements.txt (name==version --hash=sha256:...) and constraints.txt (name==version) of the
# wheels now in the folder: what the image installs, exactly.
write_pins() {
  "$PYTHON" - "$1" "$2" <<'EOF'
import hashlib, pathlib, sys
folder, extra = pathlib.Path(sys.argv[1]), sys.argv[2]
pins = []
for wheel in sorted(folder.glob("*.whl"), key=lambda p: p.name.lower()):
    name, version = wheel.name.split("-")[:2]  # wheel names escape '-' in both fields
    pins.append((name, version, hashlib.sha256(wheel.read_bytes()).hexdigest()))
header = (f"# The exact dependencies of instanas[{extra}] for the image, written by scripts/build-images.sh\n"
          "# with the wheels beside it. Do not edit: delete the folder and run the script again.\n")
(folder / "requirements.txt").write_text(
    header + "".join(f"{n}=={v} \\\n    --hash=sha256:{h}\n" for n, v, h in pins))
(folder / "constraints.txt").write_text(header + "".join(f"{n}=={v}\n" for n, v, _ in pins))
EOF
}

make_wheelhouse() {
  local extra=$1 dir=wheelhouse/$1 tmp=wheelhouse/$1.partial key
  key=$(wheelhouse_key "$extra")
  if [ -f "$dir/.key" ] && [ "$(cat "$dir/.key")" = "$key" ]; then
    log "wheelhouse/$extra: cached (key $key)"
    return
  fi
  log "wheelhouse/$extra: downloading .[$extra] for CPython $PY_VERSION, glibc 2.$GLIBC_MINOR, $ARCH (key $key)"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  # Exactly the lock's versions, each wheel checked against the lock's sha256: the image runs
  # what the tests ran. Nothing is resolved here (--no-deps: the lock's part is the closure).
  "$PYTHON" scripts/lock.py select "$extra" >"$tmp.txt"
  local download=("$PYTHON" -m pip download --quiet --disable-pip-version-check --only-binary=:all:
                  --python-version "$PY_VERSION" --implementation cp --abi "cp${PY_VERSION/./}"
                  "${PLATFORMS[@]}" --require-hashes --no-deps --dest "$tmp")
  if grep -q '^torch==' "$tmp.txt"; then
    # torch alone first, from the CPU-only index when given (one retry: an unreachable index
    # must not cost minutes), so that the download below finds this build in the folder.
    "$PYTHON" scripts/lock.py select "$extra" --package torch >"$tmp.torch.txt"
    "${download[@]}" --retries 1 ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} --requirement "$tmp.torch.txt"
  fi
  "${download[@]}" --find-links "$tmp" --requirement "$tmp.txt"
  rm -f "$tmp.txt" "$tmp.torch.txt"
  write_pins "$tmp" "$extra"
  echo "$key" >"$tmp/.key"
  rm -rf "$dir"
  mv "$tmp" "$dir"
  log "wheelhouse/$extra: $(grep -c '^[^# ]' "$dir/constraints.txt") pinned wheels, $(du -sh "$dir" | cut -f1)"
}

# --- 1. base image --------------------------------------------------------------------------

export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/.cache/podman/containers.conf}
if [ ! -f "$CONTAINERS_CONF" ]; then
  mkdir -p "$(dirname "$CONTAINERS_CONF")"
  printf '[containers]\ndefault_ulimits = []\n' >"$CONTAINERS_CONF"
fi

base_image() {
  case $BASE_IMAGE in
    localhost/*) ;;
    *) log "base $BASE_IMAGE: from its registry"; return ;;
  esac
  if "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
    log "base $BASE_IMAGE: exists"
    return
  fi
  command -v mmdebstrap >/dev/null || die "mmdebstrap not found (apt-get install mmdebstrap; see scripts/test-setup.sh)"
  log "base $BASE_IMAGE: mmdebstrap $SUITE from $MIRROR"
  local tmp
  tmp=$(mktemp -d)
  # Documentation, manuals and translations are left out (copyright files kept).
  if ! mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      --aptopt='Acquire::Languages "none"' \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
      "$SUITE" "$tmp/base.tar" \
      "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" "deb $SECURITY $SUITE-security main" \
      </dev/null >"$tmp/mmdebstrap.log" 2>&1; then
    tail -n 40 "$tmp/mmdebstrap.log" >&2
    rm -rf "$tmp"
    die "mmdebstrap failed"
  fi
  # An imported tarball has no configuration: give it what a Debian image's has.
  "${PODMAN[@]}" import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' \
    "$tmp/base.tar" "$BASE_IMAGE" >/dev/null
  rm -rf "$tmp"
}

# --- 3. images ------------------------------------------------------------------------------

build_image() {
  local target=$1 name=${IMAGE[$1]} old new
  old=$("${PODMAN[@]}" image inspect --format '{{.Id}}' "$name" 2>/dev/null || true)
  log "image $name: building ${DOCKERFILE[$target]} FROM $BASE_IMAGE"
  # docker format: OCI images cannot carry a HEALTHCHECK. chroot isolation: RUN steps need no
  # OCI runtime or network namespace (the build is offline anyway).
  "${PODMAN[@]}" build --isolation chroot --format docker --layers \
    --build-arg BASE="$BASE_IMAGE" -f "${DOCKERFILE[$target]}" -t "$name" . >&2
  new=$("${PODMAN[@]}" image inspect --format '{{.Id}}' "$name")
  # The previous build of this name, now untagged: removed, unless a container still uses it.
  if [ -n "$old" ] && [ "$old" != "$new" ]; then
    "${PODMAN[@]}" rmi "$old" >/dev/null 2>&1 || true
  fi
  log "image $name: $("${PODMAN[@]}" image inspect --format '{{.Size}}' "$name" | awk '{printf "%.0f MB", $1 / 1e6}')"
}

for target in "${targets[@]}"; do make_wheelhouse "${EXTRA[$target]}"; done
[ "$wheels_only" = 1 ] && exit 0
command -v "${PODMAN[0]}" >/dev/null || die "${PODMAN[0]} not found (apt-get install podman runc; see scripts/test-setup.sh)"
base_image
for target in "${targets[@]}"; do build_image "$target"; done

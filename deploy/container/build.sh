#!/bin/sh
# Build Ferry's container image with podman, base included, from nothing but a Debian mirror and PyPI:
#   1. a Debian bookworm root file system with python3 (debootstrap --variant=minbase), kept in the cache folder;
#   2. the base image, `podman import` of that root file system;
#   3. the Ferry image (Containerfile at the repository root) on that base.
# Each step is skipped when its result exists (the root file system by its stamp, the base image by its tag, the
# Ferry image's steps by podman's layer cache), so a second run takes seconds. Needs root for debootstrap.
#
# Environment (all optional):
#   FERRY_IMAGE            the Ferry image's tag                    (localhost/ferry:<version from pyproject.toml>)
#   FERRY_BASE_IMAGE       the base image's tag                     (localhost/ferry-base:bookworm)
#   FERRY_CONTAINER_CACHE  where the root file system is kept       (/var/tmp/ferry-container)
#   DEBIAN_MIRROR          the mirror debootstrap reads             (http://deb.debian.org/debian)
#   NUMBA_CPU_NAME         the LLVM CPU the baked kernels target    (generic: any x86-64; x86-64-v3: AVX2 nodes)
#   FERRY_BUILD_CA_BUNDLE  a CA bundle for the build's pip, when HTTPS goes through an intercepting proxy
#                          (default: $PIP_CERT when it names a file; the bundle is mounted, never copied)
#   FERRY_REBUILD=1        rebuild the root file system and the base image
# Podman flags this host needs (rlimits, OCI runtime) come from deploy/container/podman-flags.sh.
set -eu

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$ROOT/deploy/container"
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml" | head -n 1)
IMAGE=${FERRY_IMAGE:-localhost/ferry:$VERSION}
BASE=${FERRY_BASE_IMAGE:-localhost/ferry-base:bookworm}
CACHE=${FERRY_CONTAINER_CACHE:-/var/tmp/ferry-container}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates
ROOTFS="$CACHE/rootfs-$SUITE"
STAMP="$ROOTFS.done"

say() { echo "build.sh: $*" >&2; }
need() { command -v "$1" >/dev/null 2>&1 || { say "$1 is missing ($2)"; exit 3; }; }
need podman "Debian: apt-get install podman"

if [ "${FERRY_REBUILD:-0}" = 1 ]; then
  rm -rf "$ROOTFS" "$STAMP"
  podman image rm -f "$BASE" >/dev/null 2>&1 || true
fi

# 1. The root file system (the stamp records what made it: a change of suite, packages or mirror remakes it).
WANT="$SUITE $PACKAGES $MIRROR"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  need debootstrap "Debian: apt-get install debootstrap"
  [ "$(id -u)" = 0 ] || { say "debootstrap needs root (or build the base elsewhere and set FERRY_BASE_IMAGE)"; exit 3; }
  say "debootstrap $SUITE into $ROOTFS (about a minute)"
  rm -rf "$ROOTFS" "$STAMP"
  mkdir -p "$CACHE"
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
    || { say "debootstrap failed; its log: $CACHE/debootstrap.log"; tail -n 20 "$CACHE/debootstrap.log" >&2; exit 1; }
  # what an image does not need: downloaded packages, package lists, documentation and translations
  rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/usr/share/doc/* \
         "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/locale/*
  echo "$WANT" >"$STAMP"
  podman image rm -f "$BASE" >/dev/null 2>&1 || true
fi

# 2. The base image.
if ! podman image exists "$BASE"; then
  say "importing $ROOTFS as $BASE"
  tar -C "$ROOTFS" --numeric-owner -cf - . | podman import \
    --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' \
    --message "debootstrap --variant=minbase --include=$PACKAGES $SUITE" - "$BASE" >/dev/null
fi

# 3. The Ferry image. Docker format: the OCI image format has no HEALTHCHECK, and podman drops it there.
FLAGS=$(sh "$HERE/podman-flags.sh")
# shellcheck disable=SC2086  # podman-flags.sh prints separate words
set -- $FLAGS
CA=${FERRY_BUILD_CA_BUNDLE:-${PIP_CERT:-}}
if [ -n "$CA" ] && [ -f "$CA" ]; then
  set -- "$@" --volume "$CA:/etc/ssl/certs/ca-certificates.crt:ro"
fi
say "building $IMAGE on $BASE"
podman build "$@" --format docker --layers \
  --build-arg "BASE_IMAGE=$BASE" --build-arg "NUMBA_CPU_NAME=${NUMBA_CPU_NAME:-generic}" \
  --file "$ROOT/Containerfile" --tag "$IMAGE" "$ROOT"
say "built $IMAGE"
echo "$IMAGE"

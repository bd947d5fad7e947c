#!/bin/sh
# Print the podman flags `podman run` and `podman build` need on this host, one per line (none on most hosts).
# Some sandboxes (VMs without CAP_SYS_RESOURCE, hybrid cgroup v1/v2 hierarchies) refuse podman's defaults:
#   - rlimits: podman asks for RLIMIT_NOFILE 1048576 and a large RLIMIT_NPROC, which a process without
#     CAP_SYS_RESOURCE cannot set above its own hard limit ("setrlimit RLIMIT_NOFILE: Operation not permitted");
#   - crun refuses a hybrid cgroup hierarchy ("cgroups in hybrid mode not supported"), where runc runs.
# Each candidate is tried with `podman run --rm BASE true`, the first that works is printed, and the answer is kept
# in the cache folder per base image. Exit 1 (with podman's errors on stderr) when none works.
set -eu
BASE=${FERRY_BASE_IMAGE:-localhost/ferry-base:bookworm}
CACHE=${FERRY_CONTAINER_CACHE:-/var/tmp/ferry-container}
KEEP="$CACHE/podman-flags"
if [ -f "$KEEP" ] && [ "$(head -n 1 "$KEEP")" = "# $BASE" ]; then
  tail -n +2 "$KEEP"
  exit 0
fi
nofile=$(ulimit -Hn)
[ "$nofile" = unlimited ] && nofile=1048576
limits="--ulimit=nofile=$nofile:$nofile --ulimit=nproc=4096:4096"
errors=$(mktemp)
trap 'rm -f "$errors"' EXIT
for flags in "" "$limits" "--runtime=runc $limits"; do
  # shellcheck disable=SC2086  # $flags holds separate words
  if podman run --rm $flags "$BASE" true >/dev/null 2>>"$errors"; then
    mkdir -p "$CACHE"
    { echo "# $BASE"; for f in $flags; do echo "$f"; done; } >"$KEEP"
    tail -n +2 "$KEEP"
    exit 0
  fi
done
echo "podman-flags.sh: podman cannot run a container from $BASE here; podman said:" >&2
cat "$errors" >&2
exit 1

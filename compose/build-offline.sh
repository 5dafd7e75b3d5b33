#!/usr/bin/env bash
# Builds the DiffServe images where no image registry and no internet are reachable:
#   1. a Debian bookworm base image made with debootstrap from the Debian mirror apt already uses
#      (python3, python3-venv and redis-server in it: it is also the Redis image of the offline stack);
#   2. a wheelhouse collected with pip from this machine's package indexes (pip's own configuration);
#   3. both targets of compose/Dockerfile against that base, pip reading only the wheelhouse;
#   4. a Prometheus image from Debian's package (compose/prometheus.Dockerfile).
# Usage (as root, with a Docker engine running):
#   compose/build-offline.sh              # control image only (what the CPU stack runs)
#   compose/build-offline.sh --models     # also the model image (torch & co., several GB)
# Needs Debian's python3-pip (apt-get install -y python3-pip) for the wheelhouse.
# Environment: BASE_IMAGE, CONTROL_IMAGE, MODEL_IMAGE, PROMETHEUS_IMAGE (tags), WHEELHOUSE (folder), SUITE,
#   ENGINE (docker, the default, or podman: `make chart-smoke` builds with podman, no Docker engine needed).
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=${BASE_IMAGE:-diffserve-base:bookworm}
CONTROL_IMAGE=${CONTROL_IMAGE:-diffserve-control:latest}
MODEL_IMAGE=${MODEL_IMAGE:-diffserve:gpu}
PROMETHEUS_IMAGE=${PROMETHEUS_IMAGE:-diffserve-prometheus:bookworm}
WHEELHOUSE=${WHEELHOUSE:-.wheelhouse}
SUITE=${SUITE:-bookworm}
ENGINE=${ENGINE:-docker}
MODELS=0
[ "${1:-}" = "--models" ] && MODELS=1
# The classic builder: BuildKit would want to pull its frontend image, and no registry answers.
export DOCKER_BUILDKIT=0

"$ENGINE" info >/dev/null 2>&1 || { echo "build-offline: no $ENGINE engine answers (start dockerd)" >&2; exit 1; }

debian_mirror() {
    # The first Debian archive URI apt is configured with (deb822 .sources or one-line lists).
    local uri
    uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ && $2 ~ /debian\/?$/ {print $2; exit}')
    [ -n "$uri" ] || uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | awk '$1 == "deb" && $2 ~ /debian\/?$/ {print $2; exit}')
    echo "${uri:-http://deb.debian.org/debian}"
}

if ! "$ENGINE" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || { apt-get update && apt-get install -y debootstrap; }
    rootfs=$(mktemp -d /tmp/diffserve-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    echo "build-offline: debootstrap $SUITE from $(debian_mirror)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,redis-server \
        "$SUITE" "$rootfs" "$(debian_mirror)" >/dev/null
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    # (an imported file system has no image config: give it the usual PATH, for `exec sh` in a container)
    tar -C "$rootfs" -c . | "$ENGINE" import --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
fi

# The wheels the images install, resolved by Debian's own Python (3.11.2, the base's interpreter):
# markers such as python_full_version < "3.11.3" then select what the image needs.
extras=""
[ "$MODELS" = 1 ] && extras="[models]"
mkdir -p "$WHEELHOUSE"
/usr/bin/python3 -m pip download -q --only-binary=:all: -d "$WHEELHOUSE" -c constraints.txt "setuptools>=68" ".$extras"
rm -f "$WHEELHOUSE"/diffserve-*  # the project itself comes from the build context

# Served on loopback to the build (host network): unlike a wheelhouse in the build context, the
# classic builder does not tar the multi-GB torch wheels into every build.
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -m http.server --bind 127.0.0.1 --directory "$WHEELHOUSE" "$port" >/dev/null 2>&1 &
server=$!
trap 'kill "$server"' EXIT
offline_args=(--network host --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg PIP_NO_INDEX=1
              --build-arg "PIP_FIND_LINKS=http://127.0.0.1:$port/" -f compose/Dockerfile)

"$ENGINE" build "${offline_args[@]}" --target control -t "$CONTROL_IMAGE" .
built=("$CONTROL_IMAGE")
"$ENGINE" build --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$PROMETHEUS_IMAGE" - < compose/prometheus.Dockerfile
built+=("$PROMETHEUS_IMAGE")
if [ "$MODELS" = 1 ]; then
    "$ENGINE" build "${offline_args[@]}" --target models -t "$MODEL_IMAGE" .
    built+=("$MODEL_IMAGE")
fi
for image in "$BASE_IMAGE" "${built[@]}"; do
    "$ENGINE" image inspect --format "{{index .RepoTags 0}} {{.Size}}" "$image" \
        | awk '{printf "build-offline: %s %.0f MB\n", $1, $2 / 1e6}'
done

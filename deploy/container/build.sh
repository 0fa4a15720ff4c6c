#!/bin/sh
# Build the bridge and router images from the release wheelhouse, without any registry:
#
#   make wheelhouse && deploy/container/build.sh            (as root; podman, buildah, debootstrap)
#
# 1. the base image localhost/dicom-relay-base:bookworm, once: `debootstrap --variant=minbase bookworm`
#    from the Debian mirror this host's apt uses (DEBIAN_MIRROR overrides), imported with podman import;
# 2. the images localhost/dicom-relay-bridge:VERSION and localhost/dicom-relay-router:VERSION (and :latest
#    unless IMAGE / ROUTER_IMAGE name them) from deploy/container/Containerfile (targets bridge and router),
#    with buildah --isolation chroot (works where nested namespaces do not) and --layers, so the release
#    stage they share is built once.
# Environment: WHEELHOUSE (default dist/wheelhouse), IMAGE (the bridge's), ROUTER_IMAGE, BASE, DEBIAN_MIRROR.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
export CONTAINERS_CONF="${CONTAINERS_CONF:-$HERE/containers.conf}"
WHEELHOUSE=${WHEELHOUSE:-$REPO/dist/wheelhouse}
BASE=${BASE:-localhost/dicom-relay-base:bookworm}
die() { echo "build.sh: $*" >&2; exit 1; }

wheel=$(ls "$WHEELHOUSE"/dicom_relay-*.whl 2>/dev/null | head -n 1) || true
[ -n "$wheel" ] || die "no dicom_relay-*.whl in $WHEELHOUSE: run make wheelhouse first"
VERSION=$(basename "$wheel" | cut -d- -f2)
LATEST=""
[ -n "${IMAGE:-}" ] || LATEST="localhost/dicom-relay-bridge:latest"  # only for the default name
IMAGE=${IMAGE:-localhost/dicom-relay-bridge:$VERSION}
ROUTER_LATEST=""
[ -n "${ROUTER_IMAGE:-}" ] || ROUTER_LATEST="localhost/dicom-relay-router:latest"
ROUTER_IMAGE=${ROUTER_IMAGE:-localhost/dicom-relay-router:$VERSION}
for tool in podman buildah; do command -v $tool >/dev/null 2>&1 || die "$tool is missing (apt-get install -y podman buildah runc)"; done

if ! podman image exists "$BASE"; then
    command -v debootstrap >/dev/null 2>&1 || die "debootstrap is missing (apt-get install -y debootstrap)"
    mirror=${DEBIAN_MIRROR:-}
    if [ -z "$mirror" ] && [ -f /etc/apt/sources.list.d/debian.sources ]; then
        mirror=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources)
    fi
    if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
        mirror=$(awk '$1 == "deb" { print $2; exit }' /etc/apt/sources.list)
    fi
    [ -n "$mirror" ] || die "no Debian mirror found in /etc/apt: set DEBIAN_MIRROR"
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' EXIT
    echo "build.sh: debootstrap --variant=minbase bookworm from $mirror"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null
    # What debian:bookworm-slim leaves out: documentation, caches, the apt lists.
    rm -rf "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/*
    printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "$mirror" "$mirror" > "$rootfs/etc/apt/sources.list"
    tar -C "$rootfs" -c . | podman import --quiet - "$BASE" >/dev/null
    echo "build.sh: imported $BASE"
fi

context=$(mktemp -d)
trap 'rm -rf "$context" ${rootfs:+"$rootfs"}' EXIT
cp "$HERE/Containerfile" "$context/"
cp -r "$WHEELHOUSE" "$context/wheelhouse"
[ -f "$context/wheelhouse/constraints.txt" ] || cp "$REPO/requirements/constraints.txt" "$context/wheelhouse/"
for target in bridge router; do
    if [ "$target" = bridge ]; then tag=$IMAGE; else tag=$ROUTER_IMAGE; fi
    buildah build --quiet --layers --isolation chroot --format docker --build-arg "BASE=$BASE" \
        --target "$target" -f "$context/Containerfile" -t "$tag" "$context" >/dev/null
    echo "build.sh: built $tag"
done
[ -z "$LATEST" ] || podman tag "$IMAGE" "$LATEST"
[ -z "$ROUTER_LATEST" ] || podman tag "$ROUTER_IMAGE" "$ROUTER_LATEST"

#!/bin/sh
# A Debian 12 base image from Debian's own packages, for hosts that reach Debian's mirrors but
# no image registry:  docker/make-debian-base.sh [IMAGE] [MIRROR]
# (needs root, debootstrap and podman; the Dockerfiles install python3 from it themselves).
set -eu
image=${1:-localhost/debian-base:bookworm}
mirror=${2:-http://deb.debian.org/debian}
engine=${CONTAINER_ENGINE:-podman}
if $engine image exists "$image" 2>/dev/null; then echo "$image exists"; exit 0; fi
rootfs=$(mktemp -d /var/tmp/hcc-fl-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null
# no apt caches or lists in the image (apt-get update runs in each build)
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | $engine import - "$image" >/dev/null
echo "imported $image"

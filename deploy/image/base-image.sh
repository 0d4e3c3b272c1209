#!/bin/sh
# Make the Debian bookworm base image that deploy/Dockerfile builds FROM, without a registry:
# debootstrap a minbase bookworm and load it with `podman import` under the name the
# Dockerfile expects. Where no registry is reachable (or none is wanted), this is the base.
#
#   base-image.sh [IMAGE_NAME]      (default docker.io/library/debian:bookworm-slim)
#
# Environment:
#   PODMAN        the podman command line to use (default "podman"; tests give one with a
#                 private --root/--runroot so the machine's storage is never touched)
#   CACHE_DIR     where the debootstrapped tarball is kept between runs
#                 (default ${XDG_CACHE_HOME:-$HOME/.cache}/masqd-image)
#   DEBIAN_MIRROR (default http://deb.debian.org/debian)
#
# Does nothing when the image already exists. Needs root (debootstrap) and debootstrap.
set -eu
image=${1:-docker.io/library/debian:bookworm-slim}
podman=${PODMAN:-podman}
cache=${CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/masqd-image}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
tarball=$cache/bookworm-minbase.tar

# $podman is a command line, split into words on purpose.
# shellcheck disable=SC2086
if $podman image exists "$image"; then
    echo "base image $image is present"
    exit 0
fi
if [ ! -s "$tarball" ]; then
    mkdir -p "$cache"
    root=$(mktemp -d "$cache/rootfs.XXXXXX")
    trap 'rm -rf "$root"' EXIT
    debootstrap --variant=minbase bookworm "$root" "$mirror"
    # What debian:bookworm-slim also leaves out: downloaded packages and package lists.
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar --numeric-owner -C "$root" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
fi
# shellcheck disable=SC2086
$podman import --change 'CMD ["bash"]' "$tarball" "$image"
echo "imported $image from $tarball"

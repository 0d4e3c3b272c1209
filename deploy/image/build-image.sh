#!/bin/sh
# Build the masqd image from deploy/Dockerfile with podman; no Docker engine, no registry.
# The Debian base comes from base-image.sh (debootstrap + podman import) when it is missing.
#
#   build-image.sh [TAG]      (default masqd:<version in pyproject.toml>; `make image`)
#
# Environment:
#   PODMAN           the podman command line (default "podman")
#   CACHE_DIR        passed on to base-image.sh (where the debootstrapped base is kept)
#   BUILD_CA_BUNDLE  a PEM file of the CA(s) that sign the TLS the build's downloads see, for
#                    a network whose proxy intercepts TLS. Default: the CAs added to this
#                    host under /usr/local/share/ca-certificates, if any. "none": no bundle.
#
# The build runs with --network host: its package downloads need the machine's network, and
# a podman network (a bridge, firewall rules) is not wanted for a build.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/pyproject.toml" | head -n 1)
tag=${1:-masqd:$version}
podman=${PODMAN:-podman}

"$here/base-image.sh"

case ${BUILD_CA_BUNDLE:-} in
    "") ca_pem=$(cat /usr/local/share/ca-certificates/*.crt 2>/dev/null || true) ;;
    none) ca_pem= ;;
    *) ca_pem=$(cat "$BUILD_CA_BUNDLE") ;;
esac

started=$(date +%s)
# shellcheck disable=SC2086  # $podman is a command line
$podman build --network host --layers \
    --file "$repo/deploy/Dockerfile" --ignorefile "$repo/deploy/Dockerfile.dockerignore" \
    --build-arg "BUILD_CA_BUNDLE=$ca_pem" \
    --tag "$tag" "$repo"
# shellcheck disable=SC2086
size=$($podman image inspect --format '{{.Size}}' "$tag")
echo "built $tag: $((size / 1000000)) MB in $(($(date +%s) - started)) s"

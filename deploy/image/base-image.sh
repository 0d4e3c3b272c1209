#!/bin/sh
# Make the Debian bookworm base image that deploy/Dockerfile builds FROM, without a registry:
# debootstrap a minbase bookworm, slim it as the official debian:bookworm-slim is slimmed,
# and load it with `podman import` under the name the Dockerfile expects.
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
# Does nothing when the image exists and was made by this version of the script (a label
# holds the script's digest). Needs root and debootstrap.
set -eu
image=${1:-docker.io/library/debian:bookworm-slim}
podman=${PODMAN:-podman}
cache=${CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/masqd-image}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
recipe=$(sha256sum "$0" | cut -c1-16)
tarball=$cache/bookworm-minbase-$recipe.tar
label=org.masqd.base-recipe

# $podman is a command line, split into words on purpose.
# shellcheck disable=SC2086
if [ "$($podman image inspect --format "{{index .Labels \"$label\"}}" "$image" 2>/dev/null)" = "$recipe" ]; then
    echo "base image $image is present"
    exit 0
fi
if [ ! -s "$tarball" ]; then
    mkdir -p "$cache"
    rm -f "$cache"/bookworm-minbase*.tar  # made by older versions of this script
    root=$(mktemp -d "$cache/rootfs.XXXXXX")
    trap 'rm -rf "$root"' EXIT
    debootstrap --variant=minbase bookworm "$root" "$mirror"
    # The slimming of the official images (debuerreotype): no documentation, manuals or
    # translations, now or from packages installed later; no package caches.
    cat > "$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
    cat > "$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf "$root"/usr/share/man/* "$root"/usr/share/groff/* "$root"/usr/share/info/* \
        "$root"/usr/share/lintian/* "$root"/usr/share/linda/*
    find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias \
        -exec rm -rf {} +
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin \
        "$root"/var/lib/apt/lists/*
    tar --numeric-owner -C "$root" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
fi
# shellcheck disable=SC2086
$podman import --change 'CMD ["bash"]' --change "LABEL $label=$recipe" "$tarball" "$image"
echo "imported $image from $tarball"

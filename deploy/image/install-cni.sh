#!/bin/sh
# The DaemonSet's init container: install masqd-cni into the node's CNI plugin directory.
#
#   install-cni.sh [DEST_DIR]      (default /host/opt/cni/bin, the hostPath mount)
#
# Each file is written under a temporary name in the destination and renamed into place, so a
# runtime that execs the plugin meanwhile sees the old file or the new one, never half of one.
# The zip application goes first: the launcher must never point at a missing plugin.
set -eu
dest=${1:-/host/opt/cni/bin}
src=${MASQD_SHARE:-/opt/masqd/share}
install_file() { # SOURCE NAME MODE
    cp "$1" "$dest/.$2.tmp.$$"
    chmod "$3" "$dest/.$2.tmp.$$"
    mv -f "$dest/.$2.tmp.$$" "$dest/$2"
}
install_file "$src/masqd-cni.pyz" masqd-cni.pyz 0644
install_file "$src/masqd-cni.sh" masqd-cni 0755
echo "installed masqd-cni into $dest"

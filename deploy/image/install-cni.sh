#!/bin/sh
# The DaemonSet's init container: install masqd-cni into the node's CNI plugin directory.
#
#   install-cni.sh [DEST_DIR]      (default /host/opt/cni/bin, the hostPath mount)
#
# masqd-cni is a static executable (cni/, built in deploy/Dockerfile): it needs nothing on the
# node. It is copied under a temporary name in the destination and renamed into place, so a
# runtime that execs the plugin meanwhile runs the old file or the new one, never half of one.
set -eu
dest=${1:-/host/opt/cni/bin}
src=${MASQD_SHARE:-/opt/masqd/share}
cp "$src/masqd-cni" "$dest/.masqd-cni.tmp.$$"
chmod 0755 "$dest/.masqd-cni.tmp.$$"
mv -f "$dest/.masqd-cni.tmp.$$" "$dest/masqd-cni"
# The Python plugin of masqd 0.1 ran from a zip application beside its launcher: gone now.
rm -f "$dest/masqd-cni.pyz"
echo "installed masqd-cni into $dest"

#!/bin/sh
# masqd-cni, as installed into a node's CNI plugin directory by the masqd DaemonSet.
#
# The plugin is Python using only the standard library; it lives in masqd-cni.pyz next to
# this launcher and runs with the node's own python3 (3.8 or newer), in isolated mode (-I -S:
# nothing from the environment or site-packages can change it). Container runtimes exec
# plugins on the host, outside any image, hence this launcher rather than a console script.
here=${0%/*}
for python in python3 /usr/libexec/platform-python; do
    if command -v "$python" >/dev/null 2>&1; then
        exec "$python" -I -S "$here/masqd-cni.pyz" "$@"
    fi
done
# A CNI error object, so the runtime shows the reason in the pod's events.
printf '%s\n' '{"cniVersion":"1.0.0","code":100,"msg":"masqd-cni needs python3 on the node","details":"install python3 (3.8 or newer) on this node"}'
echo "masqd-cni: no python3 found on this node" >&2
exit 1

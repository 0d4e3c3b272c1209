#!/bin/sh
# Build masqd-cni as a zip application: one file that any python3 on a node can run, because
# the plugin and what it imports (masqd/__init__.py, cni.py, spool.py) are standard library
# only. Used by deploy/Dockerfile and by tests/test_deploy.py, so what is tested is what ships.
#
#   build-cni-pyz.sh REPO_DIR OUTPUT.pyz
set -eu
repo=$1
out=$2
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir "$stage/masqd"
for module in __init__ cni spool; do
    cp "$repo/masqd/$module.py" "$stage/masqd/$module.py"
done
# Our own __main__ rather than zipapp --main, which would drop main()'s return value and so
# report every CNI error as success. It refuses a python3 older than the plugin supports with a
# CNI error object, not a traceback, so the runtime shows the reason in the pod's events.
cat > "$stage/__main__.py" <<'PY'
import sys
if sys.version_info < (3, 8):
    sys.stdout.write('{"cniVersion": "1.0.0", "code": 100, "msg": "masqd-cni needs python3 3.8 or newer on the node", "details": "found %s"}\n' % sys.version.split()[0])
    sys.exit(1)
from masqd.cni import main
sys.exit(main())
PY
python3 -m zipapp "$stage" --python '/usr/bin/env python3' --output "$out"
# Fail the build if the plugin ever needs more than the standard library (-I -S: no
# site-packages, no environment), which is all a node offers.
echo '{"cniVersion":"1.0.0"}' | CNI_COMMAND=VERSION python3 -I -S "$out" >/dev/null

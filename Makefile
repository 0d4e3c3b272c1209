# The front door: `make run` and `make test` set up everything they need on a fresh Debian machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
APT_PACKAGES := nftables iproute2 containernetworking-plugins prometheus systemd curl \
                podman runc conmon catatonit busybox-static debootstrap iptables
ARGS ?=
TAG ?=

.PHONY: run test lint bench image setup apt-deps clean

setup: apt-deps $(STAMP)

# Debian packages the daemon and its tests drive for real (nft, ip, the CNI plugins, promtool,
# systemd-socket-activate; podman with runc, busybox-static for its test image, debootstrap for
# the image's base, iptables for the CNI firewall plugin). Installed only when one is missing.
# runc is named so that apt picks it for podman's "crun | runc": crun 1.8 fails on CI's cgroups.
apt-deps:
	@missing=0; \
	for cmd in nft ip promtool prometheus systemd-socket-activate systemd-analyze curl \
	           podman runc conmon debootstrap iptables; do \
	  command -v $$cmd >/dev/null 2>&1 || missing=1; done; \
	[ -x /usr/lib/cni/bridge ] && [ -x /usr/bin/catatonit ] || missing=1; \
	dpkg-query -W -f='$${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' || missing=1; \
	if [ $$missing = 1 ]; then \
	  echo ">> installing Debian packages: $(APT_PACKAGES)"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(APT_PACKAGES); \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# compat: a plain path entry instead of setuptools' import hook, ~9 ms off every start
	# (the CNI plugin is started once per container).
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=compat
	touch $(STAMP)

run: setup
	$(BIN)/masqd $(ARGS)

test: setup
	$(BIN)/pytest $(ARGS)

lint: setup
	$(BIN)/ruff check masqd tests bench
	$(BIN)/mypy

# The container image, with podman and no registry: a debootstrapped bookworm base, then
# deploy/Dockerfile (deploy/image/build-image.sh; TAG=... to name it, default masqd:VERSION).
image: apt-deps
	deploy/image/build-image.sh $(TAG)

bench: setup
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

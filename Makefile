# The front door: `make run` and `make test` set up everything they need on a fresh Debian machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
APT_PACKAGES := nftables iproute2 containernetworking-plugins prometheus systemd curl \
                podman runc conmon catatonit busybox-static debootstrap iptables
ARGS ?=
# masqd-cni: a static Go binary built from the vendored module in cni/ (works offline).
CNI_PLUGIN := cni/bin/masqd-cni
CNI_SOURCES := cni/go.mod cni/go.sum cni/vendor/modules.txt $(filter-out %_test.go,$(wildcard cni/*.go))
# A recipe's shell runs this to get its go command (see cni/find-go.sh).
GO = $$(./cni/find-go.sh $(abspath $(VENV)))
# What the tests and benchmarks run the plugin with, built from the CNI projects' own modules
# (not vendored: only `make test` and `make bench` need them, and the module proxy has them):
# bridge (a release with the nftables ipMasq backend), host-local, loopback, and cnitool.
CNI_TOOLS := $(VENV)/cni-tools
CNI_PLUGINS_MODULE := github.com/containernetworking/plugins@v1.9.1
CNITOOL_MODULE := github.com/containernetworking/cni/cnitool@v1.3.0

.PHONY: run test coverage lint bench image setup apt-deps clean test-tools
TAG ?=

setup: apt-deps $(STAMP) $(CNI_PLUGIN)

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

$(CNI_PLUGIN): $(STAMP) $(CNI_SOURCES)
	go=$(GO) && cd cni && CGO_ENABLED=0 $$go build -mod=vendor -trimpath -ldflags='-s -w' -o bin/masqd-cni .

test-tools: $(CNI_TOOLS)/.built

$(CNI_TOOLS)/.built: $(STAMP) Makefile
	mkdir -p $(CNI_TOOLS)
	go=$(GO) && cd /tmp && GOBIN=$(abspath $(CNI_TOOLS)) CGO_ENABLED=0 GOFLAGS=-buildvcs=false \
	  $$go install -trimpath $(foreach p,main/bridge main/loopback ipam/host-local,\
	    $(subst @,/plugins/$(p)@,$(CNI_PLUGINS_MODULE)))
	go=$(GO) && cd /tmp && GOBIN=$(abspath $(CNI_TOOLS)) CGO_ENABLED=0 GOFLAGS=-buildvcs=false \
	  $$go install -trimpath $(CNITOOL_MODULE)
	touch $@

run: setup
	$(BIN)/masqd $(ARGS)

# Without ARGS: first the tests that need no root, with masqd/'s line coverage (it must stay
# at COVERAGE_MIN or above; the figure is in README's Development section), then the kernel
# tests (root: network namespaces, nftables). With ARGS: pytest $(ARGS), once.
COVERAGE_MIN := 85
COVERAGE := --cov=masqd --cov-report=term --cov-fail-under=$(COVERAGE_MIN)

test: setup test-tools lint
	go=$(GO) && cd cni && $$go test -mod=vendor -count=1 ./...
ifeq ($(strip $(ARGS)),)
	$(BIN)/pytest -m "not kernel" $(COVERAGE)
	$(BIN)/pytest -m kernel
else
	$(BIN)/pytest $(ARGS)
endif

# The unprivileged part alone, with its coverage report (no root needed).
coverage: setup
	$(BIN)/pytest -m "not kernel" $(COVERAGE)

# The import contracts (layers, and who may import ctypes, pyroute2, pydantic ...) are in
# pyproject.toml, [tool.importlinter].
lint: setup
	$(BIN)/ruff check masqd tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache
	go=$(GO) && cd cni && $$go vet -mod=vendor ./...
	go=$(GO) && cd cni && out=$$("$$($$go env GOROOT)/bin/gofmt" -l *.go) && \
	  if [ -n "$$out" ]; then echo "gofmt would change: $$out"; exit 1; fi

# The container image, with podman and no registry: a debootstrapped bookworm base, then
# deploy/Dockerfile (deploy/image/build-image.sh; TAG=... to name it, default masqd:VERSION).
image: apt-deps
	deploy/image/build-image.sh $(TAG)

bench: setup test-tools
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage cni/bin

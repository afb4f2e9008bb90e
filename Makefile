# hcc-fl: the two README commands (`make demo`, `make test`) set everything up from zero.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TASK ?= ki67_ceus
DATA ?= data/phantom
SEED ?= 0
# Source files: the editable install is "strict" (a link tree, so mypy sees hcc_fl.*), and a
# new module needs a re-install of the package (not of its dependencies).
SOURCES := $(shell find server client shared configs -name '*.py' -o -name '*.yaml' 2>/dev/null)

export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export RAY_USAGE_STATS_ENABLED=0

.PHONY: install demo demo-dp deploy-demo test lint typecheck pytest system-deps clean help bench \
	docker-test container-deps

help:
	@echo "make demo [TASK=ki67_ceus]  set up .venv, generate the phantom, run the federated experiment (TASK: ki67_ceus, tace_ceus, er_ceus)"
	@echo "make test                   set up .venv, run ruff, mypy and pytest"
	@echo "make demo-dp                the demo with local DP-SGD at epsilon 8 per site"
	@echo "make deploy-demo [TASK=..]   a TLS deployment on 127.0.0.1: coordinator + 4 sites, 2 rounds"
	@echo "make docker-test            build both images with podman, run coordinator + 4 sites in containers, compare"
	@echo "make bench                  the benchmarks of bench/README.md on CPU (~1 h), then its tables"

$(VENV)/.deps: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# CPU build of torch first, so that nothing pulls a CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]' --config-settings editable_mode=strict
	touch $@

$(VENV)/.pkg: $(VENV)/.deps $(SOURCES)
	$(BIN)/python -m pip install --quiet --no-deps -e . --config-settings editable_mode=strict
	touch $@

install: $(VENV)/.pkg

$(DATA)/manifest_index.json: | install
	$(BIN)/hcc-fl synth --out $(DATA) --seed $(SEED)

demo: install $(DATA)/manifest_index.json
	$(BIN)/hcc-fl simulate task=$(TASK) data_root=$(DATA) run_name=demo-$(TASK) seed=$(SEED) overwrite=true

# The demo with local DP-SGD at epsilon 8 per site (epsilon per site in runs/demo-dp/metrics.json).
demo-dp: install $(DATA)/manifest_index.json
	$(BIN)/hcc-fl simulate task=$(TASK) data_root=$(DATA) run_name=demo-dp seed=$(SEED) overwrite=true privacy=dp privacy.target_epsilon=8

# A real deployment on 127.0.0.1 (coordinator + 4 site processes, TLS, 2 rounds) to watch.
deploy-demo: install system-deps $(DATA)/manifest_index.json
	$(BIN)/python -m hcc_fl.server.deploy_demo --data $(DATA) --runs runs --rounds 2 --task $(TASK) --name deploy-demo-$(TASK)

# The benchmarks (bench/README.md): JSON in bench/results/, then the README tables rebuilt.
BENCHES ?= aggregation wire overhead scale parity pacs_pull
bench: install system-deps $(DATA)/manifest_index.json
	@for b in $(BENCHES); do \
	  case $$b in \
	    wire) $(BIN)/python bench/wire.py --auc --data $(DATA) || exit 1 ;; \
	    overhead) $(BIN)/python bench/overhead.py --data $(DATA) --rounds 1 3 \
	      --modes plain simulation deployment || exit 1 ;; \
	    *) test -f bench/$$b.py || { echo "bench/$$b.py missing"; exit 1; }; \
	       $(BIN)/python bench/$$b.py || exit 1 ;; \
	  esac; done
	$(BIN)/python bench/table.py

lint: install
	$(BIN)/ruff check server client shared configs tests bench

typecheck: install
	$(BIN)/mypy server client shared

# Debian packages the tests use: headless Chromium (opens report.html), nginx (the
# coordinator's fleet-only front, see server/proxy.py) and Orthanc with its DICOMweb plugin (the
# PACS that `hcc-fl-client pull` is tested against; the tests start their own instance).
system-deps:
	@missing=""; command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	  { command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx; } || missing="$$missing nginx-light"; \
	  { command -v Orthanc >/dev/null 2>&1 || test -x /usr/sbin/Orthanc; } || missing="$$missing orthanc"; \
	  test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so || missing="$$missing orthanc-dicomweb"; \
	  if [ -n "$$missing" ]; then apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi

# podman (with runc, the runtime our hybrid-cgroup hosts accept) and debootstrap, for the
# container images: Debian's packages, no image registry (README "Containers").
container-deps:
	@missing=""; for c in podman runc debootstrap; do \
	  command -v $$c >/dev/null 2>&1 || test -x /usr/sbin/$$c || missing="$$missing $$c"; done; \
	  if [ -n "$$missing" ]; then apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi

# Both images built and run: coordinator + 4 sites as containers, 2 rounds, = the simulation.
docker-test: install container-deps
	CONTAINERS_CONF=$${CONTAINERS_CONF:-$(CURDIR)/docker/containers.conf} \
	  $(BIN)/pytest -m containers tests/test_containers.py -p no:cacheprovider -s

pytest: install system-deps
	$(BIN)/pytest

test: lint typecheck pytest

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache

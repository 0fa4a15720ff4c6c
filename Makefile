# Quick start on a fresh Debian 12 with Python 3.11:  make demo   and   make test
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test unit integration lint typecheck protos protos-check bench-quick bench system-deps clean wheel wheelhouse constraints image

# Debian packages the tests need (installed only when missing, and only as root).
system-deps:
	@missing=""; \
	command -v Orthanc >/dev/null 2>&1 || missing="$$missing orthanc"; \
	command -v storescp >/dev/null 2>&1 || missing="$$missing dcmtk"; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v podman >/dev/null 2>&1 || missing="$$missing podman buildah runc debootstrap"; \
	[ -x /usr/sbin/rsyslogd ] || missing="$$missing rsyslog"; \
	ls /usr/lib/*/rsyslog/lmnsd_gtls.so >/dev/null 2>&1 || missing="$$missing rsyslog-gnutls"; \
	command -v squid >/dev/null 2>&1 || [ -x /usr/sbin/squid ] || missing="$$missing squid"; \
	command -v iptables >/dev/null 2>&1 || [ -x /usr/sbin/iptables ] || missing="$$missing iptables"; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium chromium-driver"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing="$$missing haproxy"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing; \
	  else echo "missing Debian packages:$$missing (run: sudo apt-get install -y$$missing)" >&2; exit 1; fi; \
	fi

$(STAMP): pyproject.toml
	@$(PYTHON) -c "import ensurepip" 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv; \
	  else echo "python3-venv is missing (run: sudo apt-get install -y python3-venv)" >&2; exit 1; fi; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m relay_demo

# Tests run in parallel (pytest-xdist): one test file per work unit on each of TEST_WORKERS workers
# (tests/conftest.py groups the release builds and starts the slowest files first). Most integration
# tests wait on processes and networks, so 3 workers pay off on 2 cores; TEST_WORKERS=0 runs serially.
# PYTEST_ARGS adds options, e.g. make integration PYTEST_ARGS="-k spill --durations=20".
TEST_WORKERS ?= 3
PYTEST_ARGS ?=
PYTEST := $(PY) -m pytest $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile,-p no:xdist) $(PYTEST_ARGS)

test: $(STAMP) system-deps protos-check lint typecheck
	$(PYTEST) tests

unit: $(STAMP)
	$(PYTEST) tests/unit

integration: $(STAMP) system-deps
	$(PYTEST) tests/integration

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# mypy: normal on every package, strict on the sans-IO layers and routing (pyproject.toml [tool.mypy])
typecheck: $(STAMP)
	$(VENV)/bin/mypy

protos: $(STAMP)
	PYTHON=$(PY) scripts/gen_protos.sh

protos-check: $(STAMP)
	PYTHON=$(PY) scripts/gen_protos.sh --check

bench-quick: $(STAMP) system-deps
	$(PY) -m benchmarks.loopback

# WAN benchmark (root): sites A and B and a hub in network namespaces on 127/8 addresses, links shaped
# with tbf and delayed by a TUN delay stage; raw path vs OpenVPN vs relay (defaults, with S3 spill on
# moto's server in the hub) vs relay-plain vs DICOMweb (Orthanc + DICOMweb plugin). BENCH_ARGS passes
# options, e.g. make bench BENCH_ARGS="--quick"  or  BENCH_ARGS="--rtt-ms 100 --repeats 5".
BENCH_ARGS ?=
bench: $(STAMP)
	@if [ "$$(id -u)" != 0 ]; then echo "make bench needs root (network namespaces, tc, TUN)" >&2; exit 1; fi
	@missing=""; \
	command -v ip >/dev/null 2>&1 || missing="$$missing iproute2"; \
	command -v iptables >/dev/null 2>&1 || missing="$$missing iptables"; \
	command -v openvpn >/dev/null 2>&1 || missing="$$missing openvpn"; \
	command -v Orthanc >/dev/null 2>&1 || missing="$$missing orthanc"; \
	[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing="$$missing orthanc-dicomweb"; \
	command -v storescp >/dev/null 2>&1 || missing="$$missing dcmtk"; \
	if [ -n "$$missing" ]; then apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing; fi
	@$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q matplotlib
	@# the JPEG 2000 workload is encoded with Pillow's OpenJPEG (without it: pydicom's small sample file)
	@$(PY) -c "from PIL import features; assert features.check('jpg_2000')" 2>/dev/null || $(PY) -m pip install -q pillow
	@$(PY) -c "import moto.server, boto3" 2>/dev/null || $(PY) -m pip install -q 'moto[server]>=5' 'boto3>=1.34'
	$(PY) -m benchmarks.wan $(BENCH_ARGS)

# -- release -------------------------------------------------------------------------------
# wheel: dist/dicom_relay-VERSION-py3-none-any.whl.  wheelhouse: that wheel, the wheels of every pinned
# dependency and constraints.txt in dist/wheelhouse, for deploy/install.sh --wheelhouse on hosts without
# a package index (build it on the same Debian release and architecture). WHEELHOUSE_EXTRAS=s3 or gcs
# adds a cloud spill backend. constraints: re-pin requirements/constraints.txt after a dependency change.
WHEELHOUSE ?= dist/wheelhouse
VERSION = $(shell $(PYTHON) -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
WHEELHOUSE_EXTRAS ?=
wheel: $(STAMP)
	$(PY) -m pip wheel -q --no-deps -w dist .

wheelhouse: wheel
	rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)
	$(PY) -m pip wheel -q -c requirements/constraints.txt -w $(WHEELHOUSE) \
	  "dist/dicom_relay-$(VERSION)-py3-none-any.whl$(if $(WHEELHOUSE_EXTRAS),[$(WHEELHOUSE_EXTRAS)])"
	cp requirements/constraints.txt $(WHEELHOUSE)/constraints.txt
	@echo "offline install: deploy/install.sh --wheelhouse $(WHEELHOUSE) bridge|router"

constraints: $(STAMP)
	$(PY) scripts/lock_constraints.py

# The bridge container image (root; podman, buildah, debootstrap): localhost/dicom-relay-bridge:VERSION.
image: wheelhouse
	WHEELHOUSE=$(WHEELHOUSE) deploy/container/build.sh

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache

# vtorque on one machine (Debian 12, as root): `make demo` sets up and runs a VM job; `make test` runs the tests.
PREFIX    ?= /opt/vtorque
VENV      ?= $(PREFIX)/venv
GUEST_DIR ?= /var/cache/vtorque/testguest
STACK_DIR ?= /var/lib/vtorque-stack
PY        := $(VENV)/bin/python
# bash with pipefail: a failed step (pip behind a filter included) fails the target.
SHELL       := /bin/bash
.SHELLFLAGS := -o pipefail -ec
export PREFIX VTORQUE_STACK_DIR := $(STACK_DIR)

.PHONY: demo test lint setup deps venv guest configure stack broker services down unit purge compose-image

demo: setup
	deploy/single-host/demo.sh

# lint first: seconds, and a finding fails the build before 15 minutes of tests.
test: lint setup
	. $(STACK_DIR)/env && $(PY) -m pytest tests -v --durations=15

# ruff and mypy (pyproject.toml's [tool.ruff] and [tool.mypy]; both pinned in requirements.lock). mypy reads the
# tree as the package it installs as: package-dir maps vtorque.shared to shared/ and so on, which no static tool
# follows, so build/typecheck/vtorque/ links each folder under its package name.
TYPECHECK_DIR := build/typecheck/vtorque
lint: venv
	$(VENV)/bin/ruff check --no-cache .
	@mkdir -p $(TYPECHECK_DIR) && for part in shared services cli hooks; do ln -sfn ../../../$$part $(TYPECHECK_DIR)/$$part; done
	$(VENV)/bin/mypy

unit: venv
	$(PY) -m pytest tests/unit -q

# configure before stack: the hooks must exist before slurmctld starts (stack.sh restarts it when they change).
setup: deps venv guest configure stack broker services

deps:
	deploy/install-deps.sh

# Debian's python, not a user's pyenv: the Slurm hooks run as the slurm user and must be able to execute it.
# --system-site-packages brings Debian's python3-libvirt (no compiler needed). Every other package comes from
# requirements.lock (exact versions and hashes; `deploy/lock-deps.sh` regenerates it), so a fresh machine gets
# exactly what CI tested. vtorque itself is installed editable: the checkout is the code the stack runs.
venv: deps
	@[ -x $(PY) ] || { echo "venv: creating $(VENV) from /usr/bin/python3"; /usr/bin/python3 -m venv --system-site-packages $(VENV); }
	@echo "venv: installing requirements.lock into $(VENV) (about 15 s on a fresh machine)"
	$(VENV)/bin/pip install --disable-pip-version-check --require-hashes -r requirements.lock 2>&1 \
	  | { grep -vE '^WARNING: Location|^Requirement already satisfied' || true; }
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 \
	  | { grep -v '^WARNING: Location' || true; }
	install -m 755 cli/vsub.sh $(VENV)/bin/vsub  # the user's vsub: a sh front (no Python for a job without -vm)
	@$(PY) -c 'import vtorque.shared.bus, libvirt, pika, kombu' && echo "venv: $(VENV) ready"

guest: deps
	tests/guest/build.sh $(GUEST_DIR)

stack: deps configure
	VTORQUE_HOOK_DIR=$(PREFIX)/hooks deploy/single-host/stack.sh start

configure: venv guest
	deploy/single-host/configure.sh $(GUEST_DIR)

# One broker user per service, node and the hooks (needs RabbitMQ up, so after the stack).
broker: venv stack
	deploy/single-host/broker.sh

services: configure stack broker
	deploy/single-host/services.sh stop >/dev/null
	deploy/single-host/services.sh start

# The compose image (deploy/compose/: debootstrap + podman import, no registry) and the pinned podman-compose;
# tests/e2e/test_compose.py calls both itself, this only warms their caches.
compose-image: deps venv
	deploy/compose/install-compose-tool.sh
	deploy/compose/build-image.sh

# Undo what demo/test installed (Debian packages, venv, guests, caches, state): the next run is a fresh machine's.
purge:
	deploy/purge.sh

down:
	-deploy/single-host/services.sh stop
	-deploy/single-host/stack.sh stop

# The Debian 12 cloud guest with real cloud-init (tests/guest/cloud/README.md); test_cloud_guest.py builds it too.
CLOUD_GUEST_DIR ?= /var/cache/vtorque/cloudguest
.PHONY: cloud-guest
cloud-guest: deps
	tests/guest/cloud/build.sh $(CLOUD_GUEST_DIR)

# The MPI guest (tests/guest/mpi/README.md: the tiny guest's boot with Open MPI from Debian packages); `make demo`
# never needs it, and tests/e2e/test_mpi_job.py builds it too (cached) and adds it to the stack's catalog.
MPI_GUEST_DIR ?= /var/cache/vtorque/mpiguest
.PHONY: mpi-guest
mpi-guest: deps
	tests/guest/mpi/build.sh $(MPI_GUEST_DIR)

# A cluster on one machine (docs/cluster-on-one-machine.md): rig hosts in network namespaces, each compute host
# with its own slurmd, libvirtd and node worker, a three-node RabbitMQ cluster. Nothing outside the rig's
# namespaces is touched; `make rig-down` leaves no namespace, process or veth behind.
.PHONY: rig-up rig-down rig-status
rig-up: venv guest
	deploy/rig/rig.sh up

rig-down:
	deploy/rig/rig.sh down

rig-status:
	deploy/rig/rig.sh status

# Thin entry points. The lab targets run as root on a Debian 12 machine (see README.md);
# lint and unit need only the Python environment (.venv), no root.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg

.PHONY: help setup venv lock demo test lint unit integration integration-full converge lab-up \
	lab-down bench-gate bench-stage bench-ca-cycle molecule-stage molecule-role mutate template

# The venv is current when its stamp for this pyproject.toml and constraints.txt exists
# (scripts/setup-venv.sh writes it); lint and unit depend on it, not on the host setup.
VENV_STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)

help:
	@echo "make demo   - set up, start the lab, converge site.yml, verify (the main job)"
	@echo "make test   - set up, lint, unit tests, lab integration test (what CI runs)"
	@echo "make setup  - Debian packages (root) and the Python environment only"
	@echo "make venv   - the Python environment only (.venv from constraints.txt; no root)"
	@echo "make lock   - rewrite constraints.txt from the venv (after changing a pin)"
	@echo "make lint   - ruff, yamllint, ansible-lint (no root; also: pre-commit install)"
	@echo "make unit   - unit tests only (no lab, no root; JUnit: reports/junit-unit.xml)"
	@echo "make integration-full - the lab integration test plus a second whole-site run and --check"
	@echo "make lab-up / lab-down / converge - single steps"
	@echo "make molecule-stage - molecule test -s stage: lab up, site.yml, idempotence, --check, verify, lab down"
	@echo "make molecule-role SCENARIO=auth - one role scenario on the running lab (docs/molecule.md)"
	@echo "make mutate - the mutation run on the running, converged lab (docs/mutations.md)"
	@echo "make bench-gate - S/MIME gate in Postfix: with/null/without, VM and native relay (lab up)"
	@echo "make bench-stage - stage rerun and verify against their floors (lab up, converged)"
	@echo "make bench-ca-cycle - the CA signer's exchange cycle against the CA's history (no lab)"
	@echo "make template - the VMware template from the golden image, checked and booted under QEMU"

setup:
	@bash scripts/setup-host.sh

venv: $(VENV_STAMP)

$(VENV_STAMP):
	@VENV=$(VENV) bash scripts/setup-venv.sh

# Keeps the header comment of constraints.txt; the rest is the resolved dependency set
# (scripts/lock.py), not a freeze of the venv (which may hold packages nothing needs now).
lock: $(VENV_STAMP)
	@{ grep '^#' constraints.txt; $(BIN)/python scripts/lock.py; } > constraints.txt.new
	@mv constraints.txt.new constraints.txt
	@VENV=$(VENV) bash scripts/setup-venv.sh

demo: setup
	$(BIN)/safemail lab up
	$(BIN)/ansible-playbook playbooks/site.yml
	@bash scripts/demo-verify.sh

test: setup lint unit integration

lint: $(VENV_STAMP)
	$(BIN)/ruff check src tests verify bench
	$(BIN)/yamllint -s .
	$(BIN)/ansible-lint --profile production playbooks roles

# Two xdist workers (the machine's two cores; the lab is down during the unit tests): 3 min
# instead of 5 (docs/PERFORMANCE.md). UNIT_WORKERS=0 runs them in one process.
UNIT_WORKERS ?= 2
unit: $(VENV_STAMP)
	$(BIN)/pytest -q -n $(UNIT_WORKERS) -m "not lab" --junitxml=reports/junit-unit.xml tests

integration: setup
	$(BIN)/pytest -v -m lab tests/integration

# Also the --check run of site.yml on the converged stage (adds ~15 min).
integration-full: setup
	SAFEMAIL_FULL=1 $(BIN)/pytest -v -m lab tests/integration

# The VMware template (docs/production.md, "The template"): built from the golden image's base
# layer (`safemail lab image` first), checked, then booted under QEMU with pvscsi and vmxnet3
# and no external kernel until a login prompt. Root; about 3 min build + 1-2 min boot; does not
# touch a running lab. TEMPLATE_OUT must not exist yet (or be empty).
TEMPLATE_OUT ?= build/template
TEMPLATE_ARGS ?=
template: setup
	$(BIN)/safemail lab template build --out $(TEMPLATE_OUT) $(TEMPLATE_ARGS)
	$(BIN)/safemail lab template check --boot $(TEMPLATE_OUT)

converge: setup
	$(BIN)/ansible-playbook playbooks/site.yml

lab-up: setup
	$(BIN)/safemail lab up

lab-down: setup
	$(BIN)/safemail lab down

# Messages/s through the relay's Postfix with and without the S/MIME gate (lab up, relay
# converged); adds two loopback listeners on the relay for about a minute, then removes them.
bench-gate: setup
	$(BIN)/python bench/bench_smime_gate.py

# The stage's speed (docs/PERFORMANCE.md): the idempotent rerun of site.yml (whole stage and
# the nspawn hosts alone) against a bare fact run, 10 paired rounds (about 25 min, lab up and
# converged); other rows: make bench-stage BENCH_ARGS="--rows verify --verify-rounds 3"
BENCH_ARGS ?= --rows rerun,rerun-nspawn --rounds 10
bench-stage: setup
	$(BIN)/python bench/bench_stage.py $(BENCH_ARGS)

# The CA signer's exchange cycle after N = 0, 50, 200, 500 prior requests (issue 14), in-process
# on temporary state directories, no lab; about 5 minutes. E.g. BENCH_CA_ARGS="--rounds 3".
BENCH_CA_ARGS ?=
bench-ca-cycle: setup
	$(BIN)/python bench/bench_ca_cycle.py $(BENCH_CA_ARGS)

# Molecule (docs/molecule.md). The stage scenario: starts the lab, converges site.yml,
# second run changed=0, --check, verify of every built requirement, stops the lab.
molecule-stage: setup
	$(BIN)/molecule test -s stage

# One role scenario against the running lab (started if it is not; never stopped):
# converge, idempotence, check mode, verify. make molecule-role SCENARIO=auth
SCENARIO ?= auth
molecule-role: setup
	$(BIN)/molecule converge -s $(SCENARIO)
	$(BIN)/molecule idempotence -s $(SCENARIO)
	$(BIN)/molecule check -s $(SCENARIO)
	$(BIN)/molecule verify -s $(SCENARIO)

# Proof that verify can fail (docs/mutations.md): every mutation of verify/mutations.yml on
# the running, converged lab, one at a time: its tests pass first, fail while it is applied,
# and pass again after the restore.
# make mutate MUTATIONS=smime-gate-off,ca-key-world-readable
MUTATIONS ?=
mutate: setup
	$(BIN)/safemail verify --mutate --baseline --check-restore $(if $(MUTATIONS),--mutations $(MUTATIONS))

# Thin entry points. Everything runs as root on a Debian 12 machine (see README.md).
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg

.PHONY: help setup demo test lint unit integration integration-full converge lab-up lab-down

help:
	@echo "make demo   - set up, start the lab, converge site.yml, verify (the main job)"
	@echo "make test   - set up, lint, unit tests, lab integration test (what CI runs)"
	@echo "make setup  - Debian packages and the Python environment only"
	@echo "make lint   - ruff, yamllint, ansible-lint"
	@echo "make unit   - unit tests only (no lab)"
	@echo "make integration-full - the lab integration test plus a --check run of site.yml"
	@echo "make lab-up / lab-down / converge - single steps"

setup:
	@bash scripts/setup-host.sh

demo: setup
	$(BIN)/safemail lab up
	$(BIN)/ansible-playbook playbooks/site.yml
	@bash scripts/demo-verify.sh

test: setup lint unit integration

lint: setup
	$(BIN)/ruff check src tests verify
	$(BIN)/yamllint -s .
	$(BIN)/ansible-lint --profile production playbooks roles

unit: setup
	$(BIN)/pytest -q -m "not lab" tests

integration: setup
	$(BIN)/pytest -v -m lab tests/integration

# Also the --check run of site.yml on the converged stage (adds ~15 min).
integration-full: setup
	SAFEMAIL_FULL=1 $(BIN)/pytest -v -m lab tests/integration

converge: setup
	$(BIN)/ansible-playbook playbooks/site.yml

lab-up: setup
	$(BIN)/safemail lab up

lab-down: setup
	$(BIN)/safemail lab down

# The README's two commands: `make test` and `make demo`.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test

.PHONY: test venv parity tiny clean-venv

test: $(STAMP)
	@$(VPY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the suite is broken"; exit 1; fi; exit $$rc

venv: $(STAMP)

# Rebuilt whenever the pinned list changes.
$(STAMP): requirements-test.txt
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --disable-pip-version-check -q -r requirements-test.txt
	@touch $(STAMP)

parity: $(STAMP)
	$(VPY) -m ovi.tools.parity tests/fixtures/parity/*.safetensors tests/fixtures/parity/*.json \
		tests/fixtures/parity/manifests/*.json

tiny: $(STAMP)
	$(VPY) -m ovi.tools.make_tiny build/tiny

clean-venv:
	rm -rf $(VENV)

# The README's two commands: `make test` and `make demo`.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test

.PHONY: test demo venv comfy-env parity tiny clean-venv

# COMFY_REQUIRED=1: the tests against a real ComfyUI and Chromium fail instead of skipping when set-up is missing.
test: $(STAMP) comfy-env
	@COMFY_REQUIRED=1 $(VPY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the suite is broken"; exit 1; fi; exit $$rc

# A headless ComfyUI runs workflows/demo_tiny_t2av_api.json on a tiny checkpoint; prints the mp4's path.
demo: $(STAMP) comfy-env
	@$(VPY) tools/demo.py

venv: $(STAMP)

# Rebuilt whenever the pinned list changes.
$(STAMP): requirements-test.txt
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --disable-pip-version-check -q -r requirements-test.txt
	@touch $(STAMP)

# ComfyUI 0.3.75 (.cache/comfyui), its Python deps (requirements-comfy.txt, into .venv), Debian chromium and
# playwright-core (.cache/node), all pinned; each step is skipped while its stamp is current.
comfy-env: $(STAMP)
	@bash tools/comfy_env.sh

parity: $(STAMP)
	$(VPY) -m ovi.tools.parity tests/fixtures/parity/*.safetensors tests/fixtures/parity/*.json \
		tests/fixtures/parity/manifests/*.json

tiny: $(STAMP)
	$(VPY) -m ovi.tools.make_tiny build/tiny

clean-venv:
	rm -rf $(VENV)

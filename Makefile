# Two commands for a fresh machine:  `make demo`  and  `make test`.
# VENV may point outside the repo (CI keeps one under ~/.cache/amxtune) so torch installs once.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# The install is redone when the pins, the package metadata or the checkout path change
# (editable installs point at this checkout).
INSTALL_KEY := $(shell cat requirements/*.txt api/pyproject.toml operator/pyproject.toml trainer_image/pyproject.toml | { cat; echo "$(CURDIR)"; } | sha256sum | cut -c1-16)
STAMP := $(VENV)/.amxtune-$(INSTALL_KEY)
# An editable install made from another checkout since (a second clone, CI) re-points the
# venv's packages there: then the stamp is not to be trusted.
EDITABLE_HERE := $(shell test -x $(PY) && $(PY) -c "import amxtune, amxtune_api, amxtune_trainer as t; print(all(m.__file__.startswith('$(CURDIR)/') for m in (amxtune, amxtune_api, t)))" 2>/dev/null)
ifneq ($(EDITABLE_HERE),True)
$(shell rm -f $(STAMP))
endif

.PHONY: install demo test lint crds images

install: $(STAMP)

$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/pins.txt -r requirements/dev.txt \
		-e api -e operator -e 'trainer_image[export]'
	@rm -f $(VENV)/.amxtune-* && touch $@

demo: install
	$(VENV)/bin/amxtune run examples/demo.yaml

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .

crds: install
	$(VENV)/bin/amxtune crds --output crds
	$(VENV)/bin/amxtune crds --output charts/amxtune/crds
	$(VENV)/bin/amxtune crds --reference > docs/reference.md

# localhost/amxtune-operator:dev and localhost/amxtune-trainer:dev with podman, from a base image
# made locally (debootstrap); needs podman, debootstrap and runc (docs/development.md, "Images").
images:
	bash tools/images/build.sh

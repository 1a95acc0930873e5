# Two commands do all the set-up: `make demo` and `make test`.
#
# Two environments, so that every clone runs its own code without reinstalling torch:
#  * DEPS: the dependencies only (torch, jax, ... ~6 GB), outside the clone, keyed by a
#    hash of the dependency files; shared by every clone, CI and reruns; featcache itself
#    is never installed there.
#  * .venv/ inside the clone: a small venv that sees DEPS through a .pth file and holds this
#    clone's editable featcache. Deleting a clone deletes its .venv; other clones are untouched.
PYTHON ?= python3.11
DEPS_HASH := $(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-12)
DEPS ?= $(HOME)/.cache/featcache/deps-$(DEPS_HASH)
DEPS_STAMP := $(DEPS)/.deps-installed
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.featcache-$(DEPS_HASH)

.PHONY: demo test venv deps clean-venv help

help:
	@echo "make demo   set up the environment (first time only) and run featcache demo"
	@echo "make test   set up the environment (first time only) and run the test suite"

# No file prerequisites: the hash in DEPS's name already changes with the dependency files
# (a fresh clone's newer mtimes must not trigger a reinstall).
$(DEPS_STAMP):
	@echo "Creating $(DEPS) (first time only; installs torch, jax, ... ~6 GB)"
	$(PYTHON) -m venv $(DEPS)
	$(DEPS)/bin/python -m pip install --quiet --upgrade pip
	$(DEPS)/bin/python -m pip install --quiet -c constraints.txt "torch==2.14.1" "torchvision==0.29.1" setuptools
	$(DEPS)/bin/python -m pip install --quiet -c constraints.txt \
		$$($(PYTHON) tools/dependencies.py pyproject.toml --extra dev)
	touch $(DEPS_STAMP)

deps: $(DEPS_STAMP)

# The clone's own venv: DEPS on its path, this clone's package installed editable (no deps).
$(STAMP): $(DEPS_STAMP)
	rm -rf $(VENV)
	$(PYTHON) -m venv --without-pip $(VENV)
	$(PY) -c "import site, sys; open(site.getsitepackages()[0] + '/featcache-deps.pth', 'w').write(sys.argv[1] + '\n')" \
		"$$($(DEPS)/bin/python -c 'import site; print(site.getsitepackages()[0])')"
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(VENV)/bin/featcache demo

test: venv
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)

# voicecall: every set-up step lives here, so a fresh machine needs only python3.
#   make run    venv + package, then the daemon in the foreground on the mock provider
#   make test   venv + package + test extra, then the linter (ruff) and the whole trial suite
#   make lint   the linter alone (rules in ruff.toml)
#   make bench  the benchmarks (loopback only), printing their figures
#   make soak   the chaos / stateful property tests with many more examples (SOAK_EXAMPLES=300)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= voicecall.json5
TRIAL_ARGS ?= -j2 tests

SOAK_EXAMPLES ?= 300

.PHONY: run test lint bench soak clean venv system-deps

$(BIN)/python:
	@echo "==> creating the virtualenv $(VENV) (first run only)"
	$(PYTHON) -m venv $(VENV)
	@echo "==> upgrading pip in $(VENV)"
	$(BIN)/python -m pip install --quiet --upgrade pip

# Re-install whenever the packaging files change. pip's default editable install gives the
# `voicecall` script and imports from this checkout, but does not put the checkout on sys.path,
# where Twisted's plugin scan looks for twisted/plugins/: a .pth file naming the checkout does.
# (setuptools' "compat" editable mode did that too, and is deprecated.)
# The lenient mode's note about folders named like a package (our twisted/) is expected: silenced.
PIP_INSTALL = PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install
PLUGIN_PATH = $(BIN)/python -c "import sys, sysconfig; open(sysconfig.get_paths()['purelib'] + '/voicecall-checkout.pth', 'w').write(sys.argv[1] + '\n')" "$(CURDIR)"
PLUGIN_CACHE = $(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

$(VENV)/.installed-run: $(BIN)/python setup.cfg setup.py
	@echo "==> installing voicecall and its dependencies into $(VENV) (a minute or so the first time)"
	$(PIP_INSTALL) -e .
	@echo "==> letting twistd find the voicecall plugin in $(CURDIR)/twisted/plugins"
	@$(PLUGIN_PATH)
	@$(PLUGIN_CACHE)
	@touch $@

$(VENV)/.installed-test: $(BIN)/python setup.cfg setup.py
	@echo "==> installing voicecall with its test extra (carrier SDKs, hypothesis, ...) into $(VENV)"
	$(PIP_INSTALL) -e '.[test]'
	@echo "==> letting twistd find the voicecall plugin in $(CURDIR)/twisted/plugins"
	@$(PLUGIN_PATH)
	@$(PLUGIN_CACHE)
	@touch $@ $(VENV)/.installed-run

venv: $(VENV)/.installed-run

$(CONFIG):
	cp examples/mock.json5 $(CONFIG)
	@echo "created $(CONFIG) from examples/mock.json5 (edit it freely; it is not tracked)"

run: $(VENV)/.installed-run $(CONFIG)
	@echo "==> starting the daemon with $(CONFIG) (Ctrl-C stops it)"
	$(BIN)/twistd --nodaemon --pidfile= voicecall --config $(CONFIG)

LINTED = voicecall tests benchmarks tools twisted setup.py

lint: $(VENV)/.installed-test
	$(BIN)/ruff check $(LINTED)

# PostgreSQL and nginx, which some tests run for real: found, or installed where we may.
system-deps:
	@sh tools/system_deps.sh

# The linter first: a finding fails the run before the suite starts.
test: lint system-deps
	$(BIN)/python tools/run_trial.py $(TRIAL_ARGS)

soak: $(VENV)/.installed-test
	HYPOTHESIS_PROFILE=soak VOICECALL_SOAK_EXAMPLES=$(SOAK_EXAMPLES) \
		$(BIN)/python tools/run_trial.py tests.test_chaos_stateful

bench: $(VENV)/.installed-test
	$(BIN)/python -m benchmarks

clean:
	rm -rf _trial_temp* var dropin.cache twisted/plugins/dropin.cache

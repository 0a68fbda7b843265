# voicecall: every set-up step lives here, so a fresh machine needs only python3.
#   make run    venv + package, then the daemon in the foreground on the mock provider
#   make test   venv + package + test extra, then the whole trial suite
#   make bench  the benchmarks (loopback only), printing their figures
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= voicecall.json5
TRIAL_ARGS ?= -j2 --reactor=voicecall-epoll tests

.PHONY: run test bench clean venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Re-install whenever the packaging files change. "compat" editable mode puts the checkout on
# sys.path, which Twisted's plugin scan needs to find twisted/plugins/ (strict/lenient hide it).
$(VENV)/.installed-run: $(BIN)/python setup.cfg setup.py
	$(BIN)/python -m pip install --quiet --config-settings editable_mode=compat -e .
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $@

$(VENV)/.installed-test: $(BIN)/python setup.cfg setup.py
	$(BIN)/python -m pip install --quiet --config-settings editable_mode=compat -e '.[test]'
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $@ $(VENV)/.installed-run

venv: $(VENV)/.installed-run

$(CONFIG):
	cp examples/mock.json5 $(CONFIG)
	@echo "created $(CONFIG) from examples/mock.json5 (edit it freely; it is not tracked)"

run: $(VENV)/.installed-run $(CONFIG)
	$(BIN)/twistd --nodaemon --pidfile= --reactor=voicecall-epoll voicecall --config $(CONFIG)

test: $(VENV)/.installed-test
	$(BIN)/python tools/run_trial.py $(TRIAL_ARGS)

bench: $(VENV)/.installed-test
	$(BIN)/python -m benchmarks

clean:
	rm -rf _trial_temp* var dropin.cache twisted/plugins/dropin.cache

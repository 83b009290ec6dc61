# anomaly_zoo: `make test` and `make book` work on a machine with nothing but Python >= 3.10.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# pytest workers (2 cores in CI); each worker uses one torch thread (tests/conftest.py)
JOBS   ?= 2

.PHONY: install test test-fast book book-full bench leaderboard lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,book,sweep]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n $(JOBS) --durations=15 -q

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n $(JOBS) -q -m "not slow"

# chapters are executed in parallel (JOBS at a time), then the HTML is built without executing again
book: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python tests/book_check.py --jobs $(JOBS)

book-full: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python tests/book_check.py --jobs 1 --full

bench: $(STAMP)
	$(BIN)/python -m anomaly_zoo bench --dataset textures --category brick --models padim,ae --quick

# the book's leaderboard: every model x textures/phantom/digits/retina x 3 seeds (sweep.LEADERBOARD_*), quick, resumable
# (ENGINE=ray spreads the rows over a Ray cluster: RAY_ADDRESS=... make leaderboard ENGINE=ray)
ENGINE ?= local
leaderboard: $(STAMP)
	HF_HUB_OFFLINE=1 AZOO_NO_PROGRESS=1 $(BIN)/python -m anomaly_zoo bench --models all \
		--datasets textures,phantom,digits,retina --seeds 0,1,2 --quick --engine $(ENGINE) --out results/quick.csv

lint: $(STAMP)
	$(BIN)/ruff check anomaly_zoo tests

clean:
	rm -rf $(VENV) book/_build

"""Root pytest hooks. With nbval, fail the session when no cell output was compared:
a notebook run whose `# NBVAL_CHECK_OUTPUT` cells are missing or unexecuted checks nothing."""

from __future__ import annotations

import pytest

_checked: list[str] = []


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    for item in items:
        cell = getattr(item, "cell", None)
        options = getattr(item, "options", None)
        if cell is None or not isinstance(options, dict):
            continue
        if options.get("check") and cell.get("execution_count") is not None and cell.get("outputs"):
            _checked.append(item.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    nbval_on = session.config.getoption("--nbval", default=False) or \
        session.config.getoption("--nbval-lax", default=False)
    if nbval_on and not _checked and exitstatus == 0:
        print("\nnbval compared no cell output: no executed '# NBVAL_CHECK_OUTPUT' cell was "
              "collected (run `make reproduce` to refresh the committed notebooks)")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

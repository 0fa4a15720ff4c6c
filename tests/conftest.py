"""How pytest-xdist shares the suite among its workers (`make test` runs ``-n 3 --dist loadfile``).

Each test file is one unit of work, so module-scoped fixtures (Orthancs, relay networks) are set up
once. Two refinements over xdist's own ``loadfile``:

* files that build or install the release (`SERIAL_GROUPS`) form one unit: they run one after the
  other on one worker and share one wheelhouse (`release_wheelhouse` in tests/integration/conftest.py)
  instead of each burning both cores on pip and buildah at the same time;
* units start longest first (`SLOW_FIRST`, then integration before unit files), so that no worker
  picks up the 4-minute container test while the others are already idle at the end of the run.

The rules a new test must follow to run in parallel are in docs/architecture.md ("Tests").
"""

from __future__ import annotations

from typing import Any

import pytest

# Files that must not run at the same time as each other: same group name, same worker, in turn.
SERIAL_GROUPS = {
    "tests/integration/test_container.py": "release-build",
    "tests/integration/test_release.py": "release-build",
}
# Units known to take longest, started first, longest first (--durations=40 of a parallel run, summed per
# file: release-build ~230 s, test_ops ~275 s, test_relay_spill ~265 s, test_reliability ~170 s...).
# The release build goes first anyway: it is the one unit that cannot be split.
SLOW_FIRST = (
    "release-build",
    "tests/integration/test_ops.py",
    "tests/integration/cloudstore/test_relay_spill.py",
    "tests/integration/test_reliability.py",
    "tests/integration/test_accel_spill.py",
    "tests/integration/test_relay_refusals.py",
)


def work_unit(nodeid: str) -> str:
    """The unit a test belongs to: its serial group, or else its file."""
    path = nodeid.split("::", 1)[0]
    return SERIAL_GROUPS.get(path, path)


def unit_rank(unit: str) -> tuple[int, int]:
    """Sort key: the known slow units first (in SLOW_FIRST's order), then integration, then the rest."""
    if unit in SLOW_FIRST:
        return (0, SLOW_FIRST.index(unit))
    return (1, 0) if unit.startswith("tests/integration/") else (2, 0)


def _make_scheduler_class() -> type:
    from xdist.scheduler import LoadFileScheduling

    class GroupedFileScheduling(LoadFileScheduling):  # type: ignore[misc]
        """xdist's loadfile, with SERIAL_GROUPS merged into one unit and slow units first."""

        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

        def _assign_work_unit(self, node: Any) -> None:
            # loadfile orders the queue by test count: a file of 300 quick unit tests would go before the
            # 2 container tests that take minutes. Re-sort it once by rank (stable: counts break ties).
            if not getattr(self, "_ranked", False):
                ranked = sorted(self.workqueue.items(), key=lambda item: unit_rank(item[0]))
                self.workqueue.clear()
                self.workqueue.update(ranked)
                self._ranked = True
            super()._assign_work_unit(node)

    return GroupedFileScheduling


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getoption("dist") != "loadfile":
        return None  # another --dist mode asked for explicitly: xdist's own
    return _make_scheduler_class()(config, log)

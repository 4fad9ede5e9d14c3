"""Shared pytest fixtures (helpers: tests/helpers.py; real servers: tests/servers.py)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from medens.utils.atomic import atomic_write_text
from tests.helpers import ONE_EPOCH, TINY_CT, TINY_MRI, TINY_XRAY, compose, train_in_process


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """The real samples folder (`MEDENS_SAMPLES`); tests that need it skip where it is unset."""
    value = os.environ.get("MEDENS_SAMPLES")
    if not value:
        pytest.skip("MEDENS_SAMPLES is not set: the real-sample tests need ../shared/data")
    path = Path(value).resolve()
    if not path.is_dir():
        pytest.skip(f"MEDENS_SAMPLES={value} is not a directory")
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """A project root with one tiny X-ray, CT and MRI model (one epoch each, trained in-process once per
    session) and their data: the shared start of the serve and evaluation tests. Read-only: a test that
    writes next to the models works on a copy (`copy_root`)."""
    root = tmp_path_factory.mktemp("tiny_models")
    for overrides in (TINY_XRAY, ["experiment=ct", *TINY_CT], TINY_MRI):
        train_in_process(root, *overrides, *ONE_EPOCH)
    return root


@pytest.fixture
def compose_train(tmp_path: Path):
    """Compose the real conf/train.yaml with overrides, all paths redirected into tmp_path."""

    def _compose(*overrides: str):
        return compose("train", *overrides, root=tmp_path)

    return _compose


# -- scheduling on pytest-xdist workers (scripts/run_tests.sh: --dist loadgroup) --------------------------
# xdist 3.8's own loadgroup renames each grouped test's node id, which pytest 9 no longer lets a plugin do,
# so its groups are silently ignored. Here the workers write {node id: group} at collection and the
# controller's scheduler (below) reads it: a group's tests go to one worker, every other test to whichever
# worker is free.
_CHEAP_SHARED_FIXTURES = {"samples_dir"}
_GROUPS_FOLDER = "medens_test_groups"


def _shared_fixture_group(item: pytest.Item) -> str | None:
    """The xdist group of a test that shares an expensive fixture: a session fixture's tests run on one
    worker (it is built once), a module fixture's on one worker per file. Other tests go wherever a worker
    is free, so one long file no longer decides the suite's wall time."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    module_scoped = False
    for name in sorted(info.names_closure):
        defs = info.name2fixturedefs.get(name)
        if not defs or name in _CHEAP_SHARED_FIXTURES or not defs[-1].baseid:
            continue  # pytest's and plugins' own fixtures (tmp_path_factory, ...) have no baseid
        scope = defs[-1].scope
        if scope == "session":
            return f"session-{name}"
        module_scoped = module_scoped or scope in ("package", "module", "class")
    return f"module-{item.module.__name__}" if module_scoped and item.module is not None else None


def _group_of(item: pytest.Item) -> str | None:
    """The test's `xdist_group` name (`xdist_group("x")` or `xdist_group(name="x")`), None outside a group."""
    mark = item.get_closest_marker("xdist_group")
    if mark is None:
        return None
    return str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))


def pytest_itemcollected(item: pytest.Item) -> None:
    """Mark a test that shares an expensive fixture with its xdist group (explicit marks are kept)."""
    if item.get_closest_marker("xdist_group") is None:
        group = _shared_fixture_group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Start the slow tests first: xdist hands out work in collection order, and a long test picked up last
    is a long tail on one worker."""
    unit_of: dict[str, str] = {}
    slow_units: set[str] = set()
    for item in items:
        unit_of[item.nodeid] = _group_of(item) or item.nodeid
        if item.get_closest_marker("slow") is not None:
            slow_units.add(unit_of[item.nodeid])
    # stable: a group's tests keep their order and stay together (a module fixture is not built twice)
    items.sort(key=lambda it: unit_of[it.nodeid] not in slow_units)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:  # noqa: ANN001 (xdist's WorkerController)
    """Controller: the folder where each worker writes its test groups."""
    config = node.config
    if not hasattr(config, "_medens_groups_folder"):
        config._medens_groups_folder = tempfile.mkdtemp(prefix="medens-xdist-groups-")
    node.workerinput[_GROUPS_FOLDER] = config._medens_groups_folder


@pytest.hookimpl(tryfirst=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """Worker: write {node id: group} before xdist reports the collection to the controller."""
    folder = getattr(session.config, "workerinput", {}).get(_GROUPS_FOLDER)
    if folder:
        groups = {it.nodeid: group for it in session.items if (group := _group_of(it)) is not None}
        atomic_write_text(Path(folder) / f"{session.config.workerinput['workerid']}.json", json.dumps(groups))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):  # noqa: ANN001, ANN201
    """`--dist loadgroup`: xdist's scope scheduler with the groups the workers wrote; a test in no group is a
    unit of its own. Scopes go out biggest first, then in collection order (slow tests first)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    import shutil

    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:
                folder = Path(config._medens_groups_folder)
                written = sorted(folder.glob("*.json"))
                self.groups = json.loads(written[0].read_text()) if written else {}
                shutil.rmtree(folder, ignore_errors=True)
            return self.groups.get(nodeid, nodeid)

    return SharedFixtureScheduling(config, log)

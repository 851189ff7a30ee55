"""Shared test set-up: fixed seeds, Triton's interpreter on machines without CUDA, the built-in phantoms every
training test shares, and the test tiers.

``TRITON_INTERPRET`` is read when a kernel is decorated, so it is set here before any kernel module is imported.

``GSEMA_FAST_TEST_WITHOUT_TRITON=1`` runs the suite as on a machine without Triton (CI does, to hold the CPU path
to needing none): ``import triton`` then fails, the kernels' tests skip, and everything else must pass.

Tiers: ``pytest`` runs every test; ``pytest -m "not slow"`` is the quick tier for development. A test that starts a
process or trains is ``slow`` (so is one that runs the Triton kernels in Triton's interpreter, which
``backends.py`` marks), and one that needs an optional extra is also ``integration``. The guard below holds
the ``slow`` mark to what a test does: a test without it that starts a process (``subprocess``, ``os.fork``,
``multiprocessing``) or runs training steps through the package (the training loop, ``bench-step``, an
integration's trainer), itself or in a fixture it uses, fails and says which. A test that calls the step itself is
a unit test of the step, not a training.
"""

import functools
import importlib.abc
import multiprocessing.process
import os
import random
import sys

import numpy as np
import pytest
import torch

WITHOUT_TRITON = os.environ.get("GSEMA_FAST_TEST_WITHOUT_TRITON") == "1"


class _NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r} (GSEMA_FAST_TEST_WITHOUT_TRITON=1)", name=name)
        return None


if WITHOUT_TRITON:
    sys.meta_path.insert(0, _NoTriton())
elif not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import gsema_fast.step  # noqa: E402  (after the Triton set-up above; guarded below, before anything binds its steps)

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fixed_seeds():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One torch thread: on tiny inputs extra threads only add synchronisation, which costs seconds on a busy
    machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ the phantoms


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory):
    """Three centres of two cases each, 32^3: the built-in phantoms that tiny trainings and evaluations run on. Shared
    by the whole session, so read-only: a test that changes a dataset works on a copy (``shutil.copytree``). The
    session ends with a check that no test changed it."""
    from gsema_fast.data import synthesize

    root = synthesize(tmp_path_factory.mktemp("phantoms"), domains=3, cases_per_domain=2, size=32, seed=0, workers=1)
    before = _contents(root)
    yield root
    changed = sorted(k for k in before.keys() | _contents(root).keys() if before.get(k) != _contents(root).get(k))
    assert not changed, f"a test changed the shared phantoms (work on a copy): {changed}"


def _contents(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ the tiers


class UnmarkedSlowTestError(RuntimeError):
    """A test without the ``slow`` mark started a process or trained."""


class _Guard:
    """Which test runs (setup, call and teardown) and which fixture it is setting up; what slow work each did."""

    def __init__(self) -> None:
        self.item = None
        self.fixtures: list[str] = []  # being set up, innermost last
        self.slow_fixtures: dict[str, str] = {}  # fixture name -> the slow work it did
        self.violations: dict[str, str] = {}  # test id -> what it did unmarked

    def check(self, what: str) -> None:
        item = self.item
        if item is None:  # collection, or between tests
            return
        for name in self.fixtures:
            self.slow_fixtures.setdefault(name, what)
        if item.get_closest_marker("slow") is None:
            where = f"its fixture {self.fixtures[-1]!r}" if self.fixtures else "it"
            message = f"{item.nodeid} is not marked slow, but {where} {what}: mark it @pytest.mark.slow"
            self.violations.setdefault(item.nodeid, message)
            raise UnmarkedSlowTestError(message)


GUARD = _Guard()
_PROCESS_EVENTS = {"subprocess.Popen", "os.system", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty"}
# Commands with which libraries read the machine, once per process (joblib's core count under scikit-learn's t-SNE,
# platform's processor, ctypes' library search): not processes a test starts.
_MACHINE_PROBES = {"cat", "lscpu", "uname", "ldconfig"}


def _command_line(event: str, args: tuple) -> list[str]:
    """The program and arguments of a process-starting audit event (empty for a fork)."""
    command = {"subprocess.Popen": 1, "os.posix_spawn": 1, "os.spawn": 2, "os.system": 0}.get(event)
    if command is None:
        return []
    value = args[command]
    if isinstance(value, (str, bytes)):
        return os.fsdecode(value).split()
    return [os.fsdecode(a) if isinstance(a, (str, bytes, os.PathLike)) else str(a) for a in value]


def _audit(event: str, args) -> None:
    if event not in _PROCESS_EVENTS:
        return
    argv = _command_line(event, args)
    if argv and os.path.basename(argv[0]) in _MACHINE_PROBES:
        return
    GUARD.check(f"starts a process ({event}: {' '.join(argv)[:120] or 'fork'})")


sys.addaudithook(_audit)  # for good: an audit hook cannot be removed; it does nothing outside a test


def _guarded_start(start):
    @functools.wraps(start)
    def guarded(self):
        # multiprocessing's spawn and forkserver start their processes without an audit event
        GUARD.check(f"starts a process (multiprocessing: {self.name})")
        return start(self)

    return guarded


def _guarded_step(step):
    @functools.wraps(step)
    def guarded(*args, **kwargs):
        caller = sys._getframe(1)
        while caller is not None:
            module = caller.f_globals.get("__name__", "")
            if module.startswith("gsema_fast.") and module != step.__module__:
                GUARD.check(f"trains (a {step.__name__} from {module})")
                break
            caller = caller.f_back
        return step(*args, **kwargs)

    return guarded


multiprocessing.process.BaseProcess.start = _guarded_start(multiprocessing.process.BaseProcess.start)
# Every training step runs one of these two; train_step finds them in the module, and whatever imports them from it
# later (the loop, bench-step, the integrations, the tests) imports the guarded ones.
gsema_fast.step.gsema_step = _guarded_step(gsema_fast.step.gsema_step)
gsema_fast.step.single_backward_step = _guarded_step(gsema_fast.step.single_backward_step)


def _guarded_lightning_step(step):
    @functools.wraps(step)
    def guarded(*args, **kwargs):
        GUARD.check("trains (a step of Lightning's training loop)")
        return step(*args, **kwargs)

    return guarded


def pytest_collection_finish(session):
    # Lightning's loop, which the integration's callback follows on models of its own: every training step of it
    # goes through its strategy. Guarded once a test module has imported Lightning (collection does).
    if "lightning.pytorch" in sys.modules:
        from lightning.pytorch.strategies import Strategy

        Strategy.training_step = _guarded_lightning_step(Strategy.training_step)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    GUARD.item = item
    yield
    GUARD.item = None


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    GUARD.fixtures.append(fixturedef.argname)
    try:
        yield
    finally:
        GUARD.fixtures.pop()


def pytest_runtest_setup(item):
    # A fixture of a wider scope did its slow work once, for an earlier test: every test that uses it is slow too.
    if item.get_closest_marker("slow") is None:
        for name in item.fixturenames:
            if name in GUARD.slow_fixtures:
                pytest.fail(
                    f"{item.nodeid} is not marked slow, but its fixture {name!r} {GUARD.slow_fixtures[name]}: mark "
                    f"it @pytest.mark.slow",
                    pytrace=False,
                )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    message = GUARD.violations.pop(item.nodeid, None) if call.when != "teardown" else None
    if message is not None and not report.failed:  # the code under test caught the guard's exception
        report.outcome = "failed"
        report.longrepr = message

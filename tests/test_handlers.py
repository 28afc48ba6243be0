"""`worker.handlers`: loading a handler from `module:attribute`, its lifecycle callbacks and
the problems `verify` names."""

from __future__ import annotations

import itertools
import logging
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rqworkers.errors import HandlerError
from rqworkers.worker import handlers
from rqworkers.worker.handlers import Handler
from tests.support import APPS

_module_names = (f"rqw_unit_mod_{n}" for n in itertools.count())


@pytest.fixture
def write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    """Write a module with a fresh name into tmp_path; return the name. Unloaded afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written: list[str] = []

    def write(source: str) -> str:
        name = next(_module_names)
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


def test_a_function_handler(write_module: Callable[[str], str]) -> None:
    mod = write_module(
        """
        calls = []

        def handle(message):
            calls.append(message)
            return message[::-1]
        """
    )
    handler = Handler(f"{mod}:handle")
    assert handler.path == f"{mod}:handle"
    assert handler.handle(b"abc") == b"cba"
    assert sys.modules[mod].calls == [b"abc"]
    # Lifecycle calls are no-ops for a function.
    handler.setup()
    handler.on_success(b"abc", b"cba")
    handler.on_failure(b"abc", ValueError("x"))
    handler.teardown()
    assert sys.modules[mod].calls == [b"abc"]


def test_a_dotted_attribute_resolves(write_module: Callable[[str], str]) -> None:
    mod = write_module(
        """
        class Namespace:
            @staticmethod
            def handle(message):
                return len(message)
        """
    )
    assert Handler(f"{mod}:Namespace.handle").handle(b"four") == 4


_CLASS_HANDLER = """
events = []
instances = []

class Job:
    def __init__(self):
        instances.append(self)

    def setup(self):
        events.append(("setup",))

    def handle(self, message):
        events.append(("handle", message))
        if message == b"bad":
            raise ValueError("bad message")
        return message.upper()

    def on_success(self, message, result):
        events.append(("on_success", message, result))

    def on_failure(self, message, error):
        events.append(("on_failure", message, str(error)))

    def teardown(self):
        events.append(("teardown",))
"""


def test_a_class_handler_gets_every_callback(write_module: Callable[[str], str]) -> None:
    mod = write_module(_CLASS_HANDLER)
    handler = Handler(f"{mod}:Job")
    module = sys.modules[mod]
    assert len(module.instances) == 1  # one instance per Handler (per worker process)

    handler.setup()
    result = handler.handle(b"ok")
    handler.on_success(b"ok", result)
    with pytest.raises(ValueError, match="bad message"):
        handler.handle(b"bad")  # handle's failures are the caller's to judge
    handler.on_failure(b"bad", ValueError("bad message"))
    handler.teardown()

    assert module.events == [
        ("setup",),
        ("handle", b"ok"),
        ("on_success", b"ok", b"OK"),
        ("handle", b"bad"),
        ("on_failure", b"bad", "bad message"),
        ("teardown",),
    ]
    assert len(module.instances) == 1


def test_callbacks_that_raise_are_logged_and_swallowed(
    write_module: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    mod = write_module(
        """
        class Job:
            def handle(self, message):
                return 1

            def on_success(self, message, result):
                raise RuntimeError("success hook broke")

            def on_failure(self, message, error):
                raise KeyError("failure hook broke")

            def teardown(self):
                raise OSError("teardown broke")
        """
    )
    handler = Handler(f"{mod}:Job")
    with caplog.at_level(logging.ERROR, logger="rqworkers.worker.handlers"):
        handler.on_success(b"m", 1)
        handler.on_failure(b"m", ValueError("x"))
        handler.teardown()

    records = [r for r in caplog.records if r.name == "rqworkers.worker.handlers"]
    assert [r.getMessage() for r in records] == [
        f"handler {mod}:Job.on_success() raised; ignored",
        f"handler {mod}:Job.on_failure() raised; ignored",
        f"handler {mod}:Job.teardown() raised; ignored",
    ]
    assert all(r.levelno == logging.ERROR for r in records)
    assert [type(r.exc_info[1]) for r in records if r.exc_info] == [
        RuntimeError,
        KeyError,
        OSError,
    ]


def test_setup_failure_propagates(write_module: Callable[[str], str]) -> None:
    mod = write_module(
        """
        class Job:
            def setup(self):
                raise ConnectionError("database is down")

            def handle(self, message):
                return None
        """
    )
    handler = Handler(f"{mod}:Job")
    with pytest.raises(ConnectionError, match="database is down"):
        handler.setup()


def test_a_class_without_setup_is_fine(write_module: Callable[[str], str]) -> None:
    mod = write_module(
        """
        class Job:
            def handle(self, message):
                return 7
        """
    )
    handler = Handler(f"{mod}:Job")
    handler.setup()
    handler.on_success(b"m", 7)
    handler.teardown()
    assert handler.handle(b"m") == 7


@pytest.mark.parametrize(
    ("source", "attr", "message"),
    [
        ("LIMIT = 42\n", "LIMIT", "'{path}' is an int, not a function or class"),
        ("NAME = 'handle'\n", "NAME", "'{path}' is a str, not a function or class"),
        ("def handle(m):\n    pass\n", "nope", "module '{mod}' has no attribute 'nope'"),
        ("class Job:\n    pass\n", "Job.gone", "module '{mod}' has no attribute 'Job.gone'"),
        ("class Job:\n    pass\n", "Job", "class '{path}' has no handle(message) method"),
        ("class Job:\n    handle = 3\n", "Job", "class '{path}' has no handle(message) method"),
    ],
)
def test_bad_handler_targets(
    write_module: Callable[[str], str], source: str, attr: str, message: str
) -> None:
    mod = write_module(source)
    path = f"{mod}:{attr}"
    with pytest.raises(HandlerError) as info:
        Handler(path)
    assert str(info.value) == message.format(path=path, mod=mod)
    assert handlers.verify(path) == str(info.value)


def test_a_missing_module(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(HandlerError) as info:
        Handler("rqw_no_such_module_at_all:handle")
    assert str(info.value) == (
        "cannot import 'rqw_no_such_module_at_all': "
        "ModuleNotFoundError: No module named 'rqw_no_such_module_at_all'"
    )


def test_a_module_that_fails_to_import(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(APPS))
    sys.modules.pop("badimport", None)
    try:
        with pytest.raises(HandlerError) as info:
            Handler("badimport:handle")
    finally:
        sys.modules.pop("badimport", None)
    assert str(info.value) == (
        "cannot import 'badimport': ImportError: this module cannot be imported (on purpose)"
    )
    assert isinstance(info.value.__cause__, ImportError)


def test_a_module_raising_any_exception_at_import_is_a_handler_error(
    write_module: Callable[[str], str],
) -> None:
    mod = write_module("1 / 0\n")
    problem = handlers.verify(f"{mod}:handle")
    assert problem == f"cannot import {mod!r}: ZeroDivisionError: division by zero"


@pytest.mark.parametrize("path", ["no_colon", ":handle", "module:", ""])
def test_malformed_paths(path: str) -> None:
    with pytest.raises(HandlerError, match="is not of the form module:attribute"):
        Handler(path)


def test_verify_accepts_good_paths() -> None:
    assert handlers.verify("rqworkers.examples:log_message") is None
    assert handlers.verify("rqworkers.examples:Counter") is None

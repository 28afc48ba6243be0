"""`common.process`: how a child's wait status is described."""

from __future__ import annotations

import os
import signal

import pytest

from rqworkers.common.process import explain_exit
from tests.support import fork_and_wait


@pytest.mark.parametrize(
    ("status", "words"),
    [
        (0, "exit code 0"),
        (1 << 8, "exit code 1"),
        (70 << 8, "exit code 70"),
        (255 << 8, "exit code 255"),
        (signal.SIGKILL, "killed by signal 9 (SIGKILL)"),
        (signal.SIGTERM, "killed by signal 15 (SIGTERM)"),
        (signal.SIGSEGV | 0x80, "killed by signal 11 (SIGSEGV)"),  # with a core dump
        (40, "killed by signal 40 (unknown)"),  # a real-time signal without a name
    ],
)
def test_explain_exit(status: int, words: str) -> None:
    assert explain_exit(status) == words


def test_explain_exit_of_real_children() -> None:
    assert explain_exit(fork_and_wait(lambda: 3)) == "exit code 3"

    def killed() -> int:
        os.kill(os.getpid(), signal.SIGKILL)
        return 0

    assert explain_exit(fork_and_wait(killed)) == "killed by signal 9 (SIGKILL)"

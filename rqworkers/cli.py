"""Command line: parse arguments, call the right piece, turn errors into exit codes."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from rqworkers import __version__, checks, config, dead, logs, status
from rqworkers.errors import ConfigError, ExitCode, RqworkersError
from rqworkers.manager import Manager
from rqworkers.producer import Producer
from rqworkers.queue import TRANSIENT_ERRORS
from rqworkers.tasks import TaskError

log = logging.getLogger("rqworkers")

Command = Callable[[config.Config, argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rqworkers", description="Reliable Redis list consumers, supervised."
    )
    parser.add_argument("--version", action="version", version=f"rqworkers {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str, parent: Any = commands) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(name, help=text, description=text)
        sub.add_argument(
            "-c",
            "--config",
            default=os.environ.get("RQWORKERS_CONFIG"),
            required="RQWORKERS_CONFIG" not in os.environ,
            help="path of the TOML config file (default: $RQWORKERS_CONFIG)",
        )
        return sub

    command("run", "start the manager and keep one worker per (host, queue) alive")
    command("check", "validate the config, import every handler and ping every host")
    command("reload", "ask the running manager (found by [manager] pid_file) to reload")
    st = command("status", "queues and live workers of every node, read from Redis")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--watch", type=float, nargs="?", const=2.0, metavar="SECONDS",
                    help="redraw every SECONDS (default 2) until Ctrl-C")  # fmt: skip

    push = command("push", "push raw payloads onto a queue: the arguments, or stdin's lines")
    push.add_argument("--queue", help="queue name (needed when several are configured)")
    push.add_argument("--host", help="the pair's host, when the queue is on several")
    push.add_argument("payloads", nargs="*", metavar="PAYLOAD", help="default: lines of stdin")
    submit = command("submit", "send a task message to a task queue; print its id or result")
    submit.add_argument("--queue", help="queue name (needed when several are configured)")
    submit.add_argument("--host", help="the pair's host, when the queue is on several")
    submit.add_argument("task", metavar="TASK", help="module:function")
    submit.add_argument("--args", type=_json, default=[], help="JSON list")
    submit.add_argument("--kwargs", type=_json, default={}, help="JSON object")
    submit.add_argument("--timeout", type=float, help="the task's own timeout, seconds")
    submit.add_argument("--wait", type=float, nargs="?", const=0.0, metavar="S",
                        help="wait for the result, at most S seconds (default: none)")  # fmt: skip

    dead_parser = commands.add_parser("dead", help="list, show, requeue or purge dead letters")
    dead_commands = dead_parser.add_subparsers(dest="dead_command", required=True)
    for name, text in (
        ("list", "list dead letters, newest first"),
        ("show", "show one dead letter in full"),
        ("requeue", "move dead letters back to the head of the queue, counts reset"),
        ("purge", "delete dead letters"),
    ):
        sub = command(name, text, dead_commands)
        sub.add_argument("--queue", help="queue name (needed when several are configured)")
        sub.add_argument("--limit", type=int, default=None, help="at most this many")
        if name == "show":
            sub.add_argument("index", type=int, help="index from `dead list`")
            sub.add_argument("--raw", action="store_true", help="the payload's bytes only")
        if name in ("requeue", "purge"):
            sub.add_argument("indexes", type=int, nargs="*", help="indexes (default: all)")
        if name == "purge":
            sub.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Handlers are imported from the current directory, as with `python -m rqworkers`; the
    # `rqworkers` console script alone would only put its own bin directory on the path.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    args = build_parser().parse_args(argv)
    try:
        cfg = config.load(args.config)
    except ConfigError as exc:
        print(f"rqworkers: invalid configuration\n{exc}", file=sys.stderr)
        return ExitCode.CONFIG
    name = args.command if args.command != "dead" else f"dead {args.dead_command}"
    try:
        return COMMANDS[name](cfg, args)
    except RqworkersError as exc:
        print(f"rqworkers: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    except TRANSIENT_ERRORS as exc:
        print(f"rqworkers: redis failed: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    except KeyboardInterrupt:
        return ExitCode.FAILURE


def run(cfg: config.Config, args: argparse.Namespace) -> int:
    try:
        logs.configure(cfg.logging, "manager")
    except OSError as exc:
        print(
            f"rqworkers: invalid configuration\n{cfg.source}: logging.file: {exc}", file=sys.stderr
        )
        return ExitCode.CONFIG
    problems = checks.handler_problems_isolated(cfg)
    if problems:
        for line in problems:
            log.error("%s: %s", cfg.source, line)
        return ExitCode.CONFIG
    return Manager(cfg).run()


def check(cfg: config.Config, args: argparse.Namespace) -> int:
    problems = checks.handler_problems(cfg)
    unreachable = checks.host_problems(cfg)
    for line in problems + unreachable:
        print(f"{cfg.source}: {line}", file=sys.stderr)
    if problems:
        return ExitCode.CONFIG
    if unreachable:
        return ExitCode.FAILURE
    hosts = len({pair.url for pair in cfg.pairs})
    print(f"{cfg.source}: ok ({len(cfg.pairs)} queues, {hosts} hosts reachable)")
    return ExitCode.OK


def reload(cfg: config.Config, args: argparse.Namespace) -> int:
    if not cfg.manager.pid_file:
        raise RqworkersError(f"{cfg.source}: set [manager] pid_file, or send SIGHUP to the manager")
    try:
        pid = int(Path(cfg.manager.pid_file).read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        raise RqworkersError(f"cannot signal the manager in {cfg.manager.pid_file}: {exc}") from exc
    print(f"sent SIGHUP to manager {pid}")
    return ExitCode.OK


def show_status(cfg: config.Config, args: argparse.Namespace) -> int:
    def render() -> str:
        statuses = status.collect(cfg)
        return status.as_json(statuses) + "\n" if args.json else status.as_text(statuses)

    if args.watch:
        status.watch(render, args.watch, sys.stdout)
    else:
        sys.stdout.write(render())
    return ExitCode.OK


def dead_list(cfg: config.Config, args: argparse.Namespace) -> int:
    letters = dead.open_dead_letters(dead.pick_pair(cfg, args.queue))
    dead.list_letters(letters, args.limit or 20, sys.stdout)
    return ExitCode.OK


def dead_show(cfg: config.Config, args: argparse.Namespace) -> int:
    letters = dead.open_dead_letters(dead.pick_pair(cfg, args.queue))
    dead.show(letters, args.index, args.raw, sys.stdout, sys.stdout.buffer)
    return ExitCode.OK


def dead_requeue(cfg: config.Config, args: argparse.Namespace) -> int:
    letters = dead.open_dead_letters(dead.pick_pair(cfg, args.queue))
    moved = dead.take_out(letters, dead.Selection(args.indexes, args.limit), letters.requeue)
    print(f"requeued {moved} message(s) to the head of {letters.keys.queue}")
    return ExitCode.OK


def dead_purge(cfg: config.Config, args: argparse.Namespace) -> int:
    letters = dead.open_dead_letters(dead.pick_pair(cfg, args.queue))
    what = f"{len(args.indexes)} chosen" if args.indexes else f"{args.limit or 'all'}"
    if not args.yes:
        question = f"delete {what} of {len(letters)} dead letter(s) in {letters.keys.dead}?"
        answer = input(f"{question} [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return ExitCode.FAILURE
    purged = dead.take_out(letters, dead.Selection(args.indexes, args.limit), letters.purge)
    print(f"deleted {purged} dead letter(s) from {letters.keys.dead}")
    return ExitCode.OK


def _pair(cfg: config.Config, args: argparse.Namespace) -> config.PairSettings:
    pairs = tuple(p for p in cfg.pairs if args.host in (None, p.host))
    return dead.pick_pair(dataclasses.replace(cfg, pairs=pairs), args.queue)


def _json(text: str) -> Any:
    return json.loads(text)


_json.__name__ = "JSON"  # argparse names the type in its error: "invalid JSON value"


def _with_progress(lines: Iterator[str], out: TextIO, every: int = 10_000) -> Iterator[str]:
    """`lines`, counting them on `out` when it is a terminal (for large inputs)."""
    if not out.isatty():
        yield from lines
        return
    count = 0
    for count, line in enumerate(lines, 1):
        yield line
        if count % every == 0:
            out.write(f"\rread {count:,} lines")
            out.flush()
    if count >= every:
        out.write(f"\rread {count:,} lines\n")


def push(cfg: config.Config, args: argparse.Namespace) -> int:
    pair = _pair(cfg, args)
    lines = (line.rstrip("\r\n") for line in sys.stdin)
    payloads = args.payloads or _with_progress(lines, sys.stderr)
    with Producer(pair.url) as producer:
        length = producer.push_many(pair.queue, payloads)
    print(f"pushed to {pair.queue} ({length} waiting)")
    return ExitCode.OK


def submit(cfg: config.Config, args: argparse.Namespace) -> int:
    pair = _pair(cfg, args)
    if pair.tasks is None:
        raise RqworkersError(f"queue {pair.queue!r} is not a task queue (it has a handler)")
    if not isinstance(args.args, list) or not isinstance(args.kwargs, dict):
        raise RqworkersError("--args must be a JSON list and --kwargs a JSON object")
    with Producer(pair.url) as producer:
        reply_to = f"{pair.queue}:replies:{uuid.uuid4().hex}" if args.wait is not None else None
        task_id = producer.submit(
            pair.queue, args.task, args.args, args.kwargs, timeout=args.timeout, reply_to=reply_to
        )
        if reply_to is None:
            print(task_id)
            return ExitCode.OK
        try:
            result = producer.wait_reply(reply_to, args.wait or None)
        except TaskError as exc:
            print(f"rqworkers: task {task_id} failed ({exc.reason}): {exc.type}: {exc.message}",
                  file=sys.stderr)  # fmt: skip
            if exc.traceback:
                print(exc.traceback, end="", file=sys.stderr)
            return ExitCode.FAILURE
        except TimeoutError as exc:
            raise RqworkersError(f"task {task_id}: {exc}") from None
    print(json.dumps(result))
    return ExitCode.OK


COMMANDS: dict[str, Command] = {
    "push": push,
    "submit": submit,
    "run": run,
    "check": check,
    "reload": reload,
    "status": show_status,
    "dead list": dead_list,
    "dead show": dead_show,
    "dead requeue": dead_requeue,
    "dead purge": dead_purge,
}

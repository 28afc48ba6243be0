"""Command line: parse arguments, call the right piece, turn errors into exit codes."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import re
import signal
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

from rqworkers import __version__, config, logs
from rqworkers.client import tasks
from rqworkers.client.producer import Producer, due_time
from rqworkers.client.tasks import TaskError
from rqworkers.common.text import plural, printable, quoted
from rqworkers.errors import ConfigError, ExitCode, RqworkersError
from rqworkers.manager import pidfile
from rqworkers.manager.supervisor import Manager
from rqworkers.ops import checks, dead, scheduled, schedules, status
from rqworkers.store import dedup, flow, levels
from rqworkers.store.outage import REDIS_ERRORS, explain

log = logging.getLogger("rqworkers")

Command = Callable[[config.Config, argparse.Namespace], int]


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rqworkers", description="Reliable Redis list consumers, supervised."
    )
    parser.add_argument("--version", action="version", version=f"rqworkers {__version__}")
    _config_option(parser, default=None)
    parser.set_defaults(help_of=parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, text: str, parent: Any = commands) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(name, help=text, description=text)
        # SUPPRESS: a -c given before the subcommand is not overwritten by this one's default.
        _config_option(sub, default=argparse.SUPPRESS)
        return sub

    run_parser = command("run", "start the manager and keep one worker per (host, queue) alive")
    run_parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        help="overrides [logging] level (reloads included), as $RQWORKERS_LOG_LEVEL does",
    )
    command("check", "validate the config, import every handler and ping every host")
    command("reload", "ask the running manager (found by [manager] pid_file) to reload")
    st = command("status", "queues and live workers of every node, read from Redis")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--watch", type=float, nargs="?", const=2.0, metavar="SECONDS",
                    help="redraw every SECONDS (default 2) until Ctrl-C")  # fmt: skip

    sched = command("schedules", "each [[schedules]] table with its last and next fire time")
    sched.add_argument("--json", action="store_true", help="machine-readable output")

    push = command("push", "push raw payloads onto a queue: the arguments, or stdin's lines")
    push.add_argument("--queue", help="queue name (needed when several are configured)")
    push.add_argument("--host", help="the pair's host, when the queue is on several")
    push.add_argument("payloads", nargs="*", metavar="PAYLOAD", help="default: lines of stdin")
    _when_options(push)
    _dedup_options(push)
    _priority_option(push)
    submit = command("submit", "send a task message to a task queue; print its id or result")
    submit.add_argument("--queue", help="queue name (needed when several are configured)")
    submit.add_argument("--host", help="the pair's host, when the queue is on several")
    submit.add_argument("task", metavar="TASK", help="module:function")
    submit.add_argument("--args", type=_json, default=[], help="JSON list")
    submit.add_argument("--kwargs", type=_json, default={}, help="JSON object")
    # Seconds are read by `_seconds`, so that a bad value is refused in one line, like TASK.
    submit.add_argument("--timeout", metavar="S", help="the task's own timeout, seconds")
    submit.add_argument("--wait", nargs="?", const="", metavar="S",
                        help="wait for the result, at most S seconds (none: no limit)")  # fmt: skip
    _when_options(submit)
    _dedup_options(submit)
    _priority_option(submit)

    for name, text in (
        ("pause", "stop every worker of a queue, on every node, from starting messages"),
        ("resume", "let the workers of a paused queue start messages again"),
    ):
        sub = command(name, text)
        sub.add_argument("queue", metavar="QUEUE", help="the queue, as the config names it")
        sub.add_argument("--host", help="the pair's host, when the queue is on several")

    dead_parser = command("dead", "list, show, requeue or purge dead letters")
    dead_parser.set_defaults(help_of=dead_parser)
    dead_commands = dead_parser.add_subparsers(dest="dead_command", metavar="ACTION")
    for name, text in (
        ("list", "list dead letters, newest first"),
        ("show", "show one dead letter in full"),
        ("requeue", "move dead letters back to the head of the queue, counts reset"),
        ("purge", "delete dead letters"),
    ):
        sub = command(name, text, dead_commands)
        sub.add_argument("--queue", help="queue name (needed when several are configured)")
        sub.add_argument("--host", help="the pair's host, when the queue is on several")
        sub.add_argument("--limit", type=int, default=None, help="at most this many")
        if name == "show":
            sub.add_argument("index", type=int, help="index from `dead list`")
            sub.add_argument("--raw", action="store_true", help="the payload's bytes only")
        if name in ("requeue", "purge"):
            sub.add_argument("indexes", type=int, nargs="*", help="indexes (default: all)")
        if name == "purge":
            sub.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    scheduled_parser = command("scheduled", "list, run now or delete messages not yet due")
    scheduled_parser.set_defaults(help_of=scheduled_parser)
    scheduled_commands = scheduled_parser.add_subparsers(dest="scheduled_command", metavar="ACTION")
    for name, text in (
        ("list", "list delayed messages and retries, soonest first"),
        ("run-now", "make messages due now"),
        ("delete", "delete messages"),
    ):
        sub = command(name, text, scheduled_commands)
        sub.add_argument("--queue", help="queue name (needed when several are configured)")
        sub.add_argument("--host", help="the pair's host, when the queue is on several")
        if name == "list":
            sub.add_argument("--limit", type=int, default=20, help="at most this many")
        else:
            sub.add_argument("ids", nargs="+", metavar="ID", help="ids from `scheduled list`")
    return parser


def _when_options(parser: argparse.ArgumentParser) -> None:
    """`--delay` and `--at`, read by `_due` so that a bad value is refused in one line."""
    when = parser.add_mutually_exclusive_group()
    when.add_argument(
        "--delay", metavar="DURATION", help="taken no sooner than this: 30, 30s, 250ms, 5m, 2h, 1d"
    )
    when.add_argument(
        "--at", metavar="TIME", help="taken no sooner than this ISO 8601 time with a zone, "
        "e.g. 2026-12-24T18:00:00Z",
    )  # fmt: skip


def _dedup_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dedup-key", metavar="KEY", help="dropped while a message pushed with KEY is pending"
    )
    parser.add_argument(
        "--dedup-ttl", metavar="S", help="with --dedup-key: KEY blocks pushes S seconds instead"
    )


def _priority_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--priority", metavar="N", default="0", help="0 to 9: higher levels are taken first"
    )


def _priority(args: argparse.Namespace) -> int:
    """`--priority`, checked in one line."""
    try:
        return levels.check(int(args.priority) if args.priority.strip().isdigit() else None)
    except ValueError:
        raise UsageError(f"--priority: {args.priority!r} is not an integer from 0 to 9") from None


def _dedup(args: argparse.Namespace) -> dict[str, Any]:
    """The deduplication options of `push` and `submit`, checked; {} for none."""
    if args.dedup_key is None:
        if args.dedup_ttl is not None:
            raise UsageError("--dedup-ttl goes with --dedup-key")
        return {}
    try:
        dedup.check_key(args.dedup_key)
    except ValueError as exc:
        raise UsageError(f"--dedup-key: {exc}") from None
    ttl = None if args.dedup_ttl is None else _seconds(args.dedup_ttl, "--dedup-ttl")
    return {"dedup_key": args.dedup_key, "dedup_ttl": ttl}


def _config_option(parser: argparse.ArgumentParser, default: object) -> None:
    """`-c/--config`, accepted before the subcommand and after it, as people type it."""
    parser.add_argument(
        "-c",
        "--config",
        default=default,
        metavar="PATH",
        help="path of the TOML config file (default: $RQWORKERS_CONFIG)",
    )


def _incomplete(args: argparse.Namespace) -> bool:
    """Print the help of a command given without its action (`rqworkers dead`): True if so.

    Help rather than argparse's `required: dead_command`, which tells a newcomer nothing.
    """
    if args.command is None or any(
        args.command == group and getattr(args, f"{group}_command") is None
        for group in ("dead", "scheduled")
    ):
        args.help_of.print_help()
        return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    # Handlers are imported from the current directory, as with `python -m rqworkers`; the
    # `rqworkers` console script alone would only put its own bin directory on the path.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    parser = build_parser()
    args = parser.parse_args(argv)
    if _incomplete(args):
        return ExitCode.CONFIG
    args.config = args.config or os.environ.get("RQWORKERS_CONFIG")
    if not args.config:
        parser.error("-c/--config PATH is required (or set RQWORKERS_CONFIG)")
    if getattr(args, "log_level", None):
        # Through the environment, so that a reload (SIGHUP) keeps the override too.
        os.environ["RQWORKERS_LOG_LEVEL"] = args.log_level
    try:
        cfg = config.load(args.config)
    except ConfigError as exc:
        print(f"rqworkers: invalid configuration\n{exc}", file=sys.stderr)
        return ExitCode.CONFIG
    action = getattr(args, f"{args.command}_command", None)
    name = f"{args.command} {action}" if action else args.command
    try:
        return COMMANDS[name](cfg, args)
    except ConfigError as exc:  # a start problem: reported as `check` reports a bad config
        print(f"rqworkers: cannot start\n{exc}", file=sys.stderr)
        return ExitCode.CONFIG
    except UsageError as exc:
        print(f"rqworkers {name}: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    except RqworkersError as exc:
        print(f"rqworkers: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    except REDIS_ERRORS as exc:
        print(f"rqworkers: redis failed: {explain(exc)}", file=sys.stderr)
        return ExitCode.FAILURE
    except KeyboardInterrupt:
        return ExitCode.FAILURE


def run(cfg: config.Config, args: argparse.Namespace) -> int:
    problems = checks.start_problems(cfg)
    if problems:  # as `check` reports them; the manager then takes what it must hold
        raise ConfigError(cfg.source, problems)
    try:
        logs.configure(cfg.logging, "manager")
    except OSError as exc:
        print(
            f"rqworkers: invalid configuration\n{cfg.source}: logging.file: {exc}", file=sys.stderr
        )
        return ExitCode.CONFIG
    # What `check` refuses, `run` refuses: the collisions too, by each server's identity.
    problems, unchecked = checks.start_collision_problems(cfg)
    for line in unchecked:
        log.warning("%s: %s", cfg.source, line)
    problems += checks.handler_problems_isolated(cfg)
    if problems:
        for line in problems:
            log.error("%s: %s", cfg.source, line)
        return ExitCode.CONFIG
    return Manager(cfg).run()


def check(cfg: config.Config, args: argparse.Namespace) -> int:
    problems = checks.handler_problems(cfg) + checks.start_problems(cfg)
    identities: dict[str, object] = {}
    unreachable = checks.host_problems(cfg, identities=identities)
    problems += checks.collision_problems(cfg, identities)
    for line in problems + unreachable:
        print(f"{cfg.source}: {line}", file=sys.stderr)
    if problems:
        return ExitCode.CONFIG
    if unreachable:
        return ExitCode.FAILURE
    queues = plural(len(cfg.pairs), "queue")
    hosts = plural(len({pair.url for pair in cfg.pairs}), "host")
    print(f"{cfg.source}: ok ({queues}, {hosts} reachable)")
    return ExitCode.OK


def reload(cfg: config.Config, args: argparse.Namespace) -> int:
    if not cfg.manager.pid_file:
        raise RqworkersError(f"{cfg.source}: set [manager] pid_file, or send SIGHUP to the manager")
    try:
        pid = pidfile.running_manager(cfg.manager.pid_file)
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        raise RqworkersError(f"cannot signal the manager in {cfg.manager.pid_file}: {exc}") from exc
    print(f"sent SIGHUP to manager {pid}")
    return ExitCode.OK


def show_status(cfg: config.Config, args: argparse.Namespace) -> int:
    statuses: list[status.PairStatus] = []

    def render() -> str:
        statuses[:] = status.collect(cfg)
        return status.as_json(statuses) + "\n" if args.json else status.as_text(statuses)

    if args.watch:
        status.watch(render, args.watch, sys.stdout)
    else:
        sys.stdout.write(render())
    return status.exit_code(statuses)


def show_schedules(cfg: config.Config, args: argparse.Namespace) -> int:
    found = schedules.collect(cfg)
    if args.json:
        print(json.dumps(schedules.as_dicts(found), indent=2))
    else:
        schedules.write_text(found, sys.stdout)
    return ExitCode.FAILURE if any(s.error for s in found) else ExitCode.OK


def dead_list(cfg: config.Config, args: argparse.Namespace) -> int:
    letters = dead.open_dead_letters(_pair(cfg, args))
    dead.list_letters(letters, args.limit or 20, sys.stdout)
    return ExitCode.OK


def dead_show(cfg: config.Config, args: argparse.Namespace) -> int:
    letters = dead.open_dead_letters(_pair(cfg, args))
    dead.show(letters, args.index, args.raw, sys.stdout, sys.stdout.buffer)
    return ExitCode.OK


def dead_requeue(cfg: config.Config, args: argparse.Namespace) -> int:
    letters = dead.open_dead_letters(_pair(cfg, args))
    moved = dead.act_on(letters, dead.Selection(args.indexes, args.limit), letters.requeue)
    print(f"requeued {plural(moved, 'message')} to the head of {letters.keys.queue}")
    return ExitCode.OK


def dead_purge(cfg: config.Config, args: argparse.Namespace) -> int:
    if not args.yes and not sys.stdin.isatty():
        # No one to answer the question: refuse rather than guess, or die on EOF.
        print(
            "rqworkers: dead purge asks for confirmation on a terminal; "
            "pass --yes to delete without asking",
            file=sys.stderr,
        )
        return ExitCode.CONFIG
    letters = dead.open_dead_letters(_pair(cfg, args))
    if not args.yes and not _confirmed(_purge_question(args, len(letters), letters.keys.dead)):
        print("nothing deleted")
        return ExitCode.FAILURE
    purged = dead.act_on(letters, dead.Selection(args.indexes, args.limit), letters.purge)
    print(f"deleted {plural(purged, 'dead letter')} from {letters.keys.dead}")
    return ExitCode.OK


def scheduled_list(cfg: config.Config, args: argparse.Namespace) -> int:
    scheduled.list_scheduled(scheduled.open_retry_set(_pair(cfg, args)), args.limit, sys.stdout)
    return ExitCode.OK


def scheduled_run_now(cfg: config.Config, args: argparse.Namespace) -> int:
    retry_set = scheduled.open_retry_set(_pair(cfg, args))
    done = retry_set.run_now([item.member for item in scheduled.chosen(retry_set, args.ids)])
    print(f"made {plural(done, 'message')} due now on {retry_set.keys.queue}")
    return ExitCode.OK


def scheduled_delete(cfg: config.Config, args: argparse.Namespace) -> int:
    retry_set = scheduled.open_retry_set(_pair(cfg, args))
    done = retry_set.delete([item.member for item in scheduled.chosen(retry_set, args.ids)])
    print(f"deleted {plural(done, 'message')} from {retry_set.keys.retry}")
    return ExitCode.OK


def _purge_question(args: argparse.Namespace, total: int, key: str) -> str:
    what = f"{len(args.indexes)} chosen" if args.indexes else f"{args.limit or 'all'}"
    return f"delete {what} of {plural(total, 'dead letter')} in {key}?"


def _confirmed(question: str) -> bool:
    """The operator's yes; no answer at all (end of input) is a no."""
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        print()
        return False
    return answer.strip().lower() in ("y", "yes")


def _pair(cfg: config.Config, args: argparse.Namespace) -> config.PairSettings:
    """The pair a command acts on: `--queue` (or QUEUE) on `--host`. A queue name on several
    hosts must be chosen with `--host` (as the page's API asks): acting on the first alone
    would push, pause, requeue or purge on one host and say nothing of the others."""
    if args.host is None:
        named = [p for p in cfg.pairs if p.queue == args.queue]
        # A host given as a URL is shown redacted: no password on a terminal.
        hosts = list(dict.fromkeys(p.host if p.host != p.url else p.endpoint for p in named))
        if len(hosts) > 1:
            raise UsageError(
                f"queue {args.queue!r} is on several hosts ({', '.join(hosts)}): "
                "choose one with --host"
            )
    pairs = tuple(p for p in cfg.pairs if args.host in (None, p.host))
    return dead.pick_pair(dataclasses.replace(cfg, pairs=pairs), args.queue)


def _json(text: str) -> Any:
    try:
        return tasks.decode_json(text)  # as a worker reads it: no NaN, no 1e400
    except (ValueError, RecursionError) as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None


_json.__name__ = "JSON"  # argparse names the type in its error: "invalid JSON value"


class UsageError(RqworkersError):
    """A command-line value that is refused before anything is sent: exit 2, one line."""


def _seconds(text: str, option: str) -> float:
    """A number of seconds given on the command line: finite, at most a week, and at least
    `config.MIN_TIMEOUT`, below which a timer means nothing (1e-300 would give up at once)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not config.MIN_TIMEOUT <= value <= config.MAX_SECONDS:  # also false for nan
        raise UsageError(
            f"{option}: {text!r} is not a number of seconds from {config.MIN_TIMEOUT:g} to "
            f"{config.MAX_SECONDS:g} (a week)"
        )
    return value


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _due(args: argparse.Namespace) -> float | None:
    """When `--delay` or `--at` says the message is due, epoch seconds; None for neither."""
    try:
        if args.delay is not None:
            match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*(ms|s|m|h|d)?\s*", args.delay)
            if not match:
                raise ValueError(f"{args.delay!r} is not a duration such as 30s, 5m or 2h")
            return due_time(float(match[1]) * _UNITS[match[2] or "s"], None)
        if args.at is not None:
            at = datetime.datetime.fromisoformat(args.at)
            if at.utcoffset() is None:
                raise ValueError(f"{args.at!r} has no time zone: end it with Z or +01:00")
            return due_time(None, at)
    except ValueError as exc:
        raise UsageError(f"--{'delay' if args.delay is not None else 'at'}: {exc}") from None
    return None


def _with_progress(lines: Iterator[bytes], out: TextIO, every: int = 10_000) -> Iterator[bytes]:
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
    due = _due(args)
    once = _dedup(args)
    level = _priority(args)
    if once:
        return _push_once(pair, args, due, {**once, "priority": level})
    # Bytes as given, from stdin and from the arguments alike: a payload need not be UTF-8.
    # Only the line's own "\n" goes; a "\r" before it is the payload's.
    lines = (line.removesuffix(b"\n") for line in sys.stdin.buffer)
    payloads = [os.fsencode(p) for p in args.payloads] or _with_progress(lines, sys.stderr)
    with Producer(pair.url) as producer:
        if due is None and not level:
            length = producer.push_many(pair.queue, payloads)
            print(f"pushed to {pair.queue} ({length} waiting)")
        elif due is None:
            length = producer.push_many(pair.queue, payloads, priority=level)
            print(f"pushed to {pair.queue} at priority {level} ({length} in {pair.queue}:retry)")
        else:
            length = producer.push_many(pair.queue, payloads, at=due, priority=level)
            print(f"scheduled on {pair.queue} for {_iso(due)} ({length} scheduled)")
    return ExitCode.OK


def _push_once(
    pair: config.PairSettings, args: argparse.Namespace, due: float | None, once: dict[str, Any]
) -> int:
    """`push --dedup-key`: one payload, enqueued or dropped, and which."""
    if len(args.payloads) != 1:
        raise UsageError("--dedup-key pushes exactly one PAYLOAD, given as an argument")
    with Producer(pair.url) as producer:
        sent = producer.push(pair.queue, os.fsencode(args.payloads[0]), at=due, **once)
    if sent:
        print(f"pushed to {pair.queue} (dedup key {printable(args.dedup_key)})")
    else:
        print(_dropped(args, pair))
    return ExitCode.OK


def _dropped(args: argparse.Namespace, pair: config.PairSettings) -> str:
    """What `push` and `submit` say of a message their `--dedup-key` dropped."""
    return (
        f"dropped: a message with dedup key {printable(args.dedup_key)} is pending on {pair.queue}"
    )


def _iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat(timespec="milliseconds")


def submit(cfg: config.Config, args: argparse.Namespace) -> int:
    pair = _pair(cfg, args)
    if pair.tasks is None:
        raise RqworkersError(f"queue {pair.queue!r} is not a task queue (it has a handler)")
    if not isinstance(args.args, list) or not isinstance(args.kwargs, dict):
        raise UsageError("--args must be a JSON list and --kwargs a JSON object")
    try:
        tasks.path_of(args.task)
    except ValueError as exc:
        raise UsageError(f"TASK: {exc}") from None
    timeout = None if args.timeout is None else _seconds(args.timeout, "--timeout")
    due = _due(args)
    once = _dedup(args)
    level = _priority(args)
    wait = _seconds(args.wait, "--wait") if args.wait else None  # `--wait` alone: no limit
    with Producer(pair.url) as producer:
        reply_to = Producer.reply_key(pair.queue) if args.wait is not None else None
        task_id = producer.submit(
            pair.queue,
            args.task,
            args.args,
            args.kwargs,
            timeout=timeout,
            reply_to=reply_to,
            at=due,
            priority=level,
            **once,
        )
        if once and not task_id:  # nothing sent: no reply to wait for
            print(_dropped(args, pair))
            return ExitCode.OK
        if reply_to is None:
            print(task_id)
            return ExitCode.OK
        try:
            result = producer.wait_reply(reply_to, wait)
        except TaskError as exc:
            # What the worker replied, which whoever can write the reply list could forge.
            why = printable(f"{exc.reason}): {exc.type}: {exc.message}")
            print(f"rqworkers: task {task_id} failed ({why}", file=sys.stderr)
            if exc.traceback:
                print(quoted(exc.traceback), end="", file=sys.stderr)
            return ExitCode.FAILURE
        except TimeoutError as exc:
            raise RqworkersError(f"task {task_id}: {exc}") from None
    print(json.dumps(result))
    return ExitCode.OK


def pause(cfg: config.Config, args: argparse.Namespace) -> int:
    pair = _pair(cfg, args)
    with Producer(pair.url) as producer:
        done = flow.pause(
            producer.client, pair.queue, by=f"rqworkers pause ({socket.gethostname()})"
        )
    print(f"paused {pair.queue}" if done else f"{pair.queue} was paused already")
    return ExitCode.OK


def resume(cfg: config.Config, args: argparse.Namespace) -> int:
    pair = _pair(cfg, args)
    with Producer(pair.url) as producer:
        done = flow.resume(producer.client, pair.queue)
    print(f"resumed {pair.queue}" if done else f"{pair.queue} was not paused")
    return ExitCode.OK


COMMANDS: dict[str, Command] = {
    "pause": pause,
    "resume": resume,
    "push": push,
    "submit": submit,
    "run": run,
    "check": check,
    "reload": reload,
    "status": show_status,
    "schedules": show_schedules,
    "dead list": dead_list,
    "dead show": dead_show,
    "dead requeue": dead_requeue,
    "dead purge": dead_purge,
    "scheduled list": scheduled_list,
    "scheduled run-now": scheduled_run_now,
    "scheduled delete": scheduled_delete,
}

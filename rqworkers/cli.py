"""Command line: parse arguments, call the right piece, turn errors into exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from rqworkers import __version__, checks, config, logs
from rqworkers.errors import ConfigError, ExitCode
from rqworkers.manager import Manager

log = logging.getLogger("rqworkers")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rqworkers", description="Reliable Redis list consumers, supervised."
    )
    parser.add_argument("--version", action="version", version=f"rqworkers {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (
        ("run", "start the manager and keep one worker per (host, queue) alive"),
        ("check", "validate the config, import every handler and ping every host"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument(
            "-c",
            "--config",
            default=os.environ.get("RQWORKERS_CONFIG"),
            required="RQWORKERS_CONFIG" not in os.environ,
            help="path of the TOML config file (default: $RQWORKERS_CONFIG)",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config.load(args.config)
    except ConfigError as exc:
        print(f"rqworkers: invalid configuration\n{exc}", file=sys.stderr)
        return ExitCode.CONFIG
    if args.command == "check":
        return check(cfg)
    return run(cfg)


def check(cfg: config.Config) -> int:
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


def run(cfg: config.Config) -> int:
    logs.configure(cfg.logging, "manager")
    problems = checks.handler_problems_isolated(cfg)
    if problems:
        for line in problems:
            log.error("%s: %s", cfg.source, line)
        return ExitCode.CONFIG
    return Manager(cfg).run()

"""The ``gateway`` command: serve, check, test, explain and eval policies, pull the platform's, read usage."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.app import run, usage_body
from gateway.audit import configure_logging
from gateway.config import PARSERS, ConfigError, Settings, load_settings
from gateway.demo import add_demo_parser
from gateway.evaluation import EvalInputError, eval_files, render_eval
from gateway.judge.client import JudgeSettings
from gateway.judge.offline import (
    LiveVerdicts,
    RecordedVerdicts,
    VerdictSource,
    VerdictSourceError,
    read_api_key,
)
from gateway.policy import (
    BUILTIN_POLICY_DIR,
    Decision,
    PolicyError,
    Stage,
    compile_ruleset,
    evaluate,
    load_rules,
    load_ruleset,
)
from gateway.policy.holdback import plan_holdback
from gateway.policy.loader import rule_warnings
from gateway.policy.selftest import run_rule_tests
from gateway.policy_pull import add_policies_parser
from gateway.runtime import run_loop
from gateway.settings_help import flag_help, settings_epilog
from gateway.usage.redis_store import RedisUsageStore
from gateway.usage.store import Period, StoreUnavailable, Totals
from gateway.workers import serve_workers


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`gateway eval ... | head`): what it read is what it wanted. The
        # rest of the output goes nowhere, so that the interpreter's last flush fails quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{len(exc.problems)} error(s): policies refused", file=sys.stderr)
        return 1
    except VerdictSourceError as exc:
        for refused in exc.problems:
            print(f"gateway: {refused}", file=sys.stderr)
        return 2
    except (EvalInputError, OSError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    check = commands.add_parser(
        "check", help="validate policy files; exit 1 listing every error (warnings listed, exit 0)"
    )
    _policy_paths(check)
    check.add_argument(
        "--holdback",
        action="store_true",
        help="also list how streamed answers are held back for each block rule of the response stage",
    )
    check.add_argument(
        "--stream-holdback",
        type=int,
        default=Settings().stream_holdback,
        metavar="N",
        help="with --holdback: the most characters held back, as serve's flag (default %(default)s)",
    )
    check.set_defaults(run=_check)

    test = commands.add_parser("test", help="run every rule's tests")
    _policy_paths(test)
    _judge_options(test)
    test.set_defaults(run=_test)

    explain = commands.add_parser("explain", help="show the decision on a text and where rules match")
    _policies_option(explain)
    explain.add_argument("--stage", choices=[s.value for s in Stage], default="prompt")
    explain.add_argument("text", help="the text, or - to read standard input")
    explain.set_defaults(run=_explain)

    evaluation = commands.add_parser("eval", help="precision and recall on labelled JSON lines")
    _policies_option(evaluation)
    evaluation.add_argument("--json", action="store_true", help="one JSON object on stdout")
    evaluation.add_argument(
        "--min-action",
        choices=["log", "alert", "block"],
        default="log",
        help="count a text as flagged only when a rule of this action or stronger matches",
    )
    _judge_options(evaluation)
    evaluation.add_argument("files", nargs="+", type=Path, metavar="FILE.jsonl")
    evaluation.set_defaults(run=_eval)

    _add_serve_parser(commands)

    add_demo_parser(commands)

    add_policies_parser(commands)

    usage = commands.add_parser("usage", help="a workspace's token totals, read from Redis")
    usage.add_argument("workspace")
    usage.add_argument("--redis-url", help="default: REDIS_URL")
    usage.add_argument("--period", choices=["day", "month"], default="day")
    usage.set_defaults(run=_usage)
    return parser


def _add_serve_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    width = shutil.get_terminal_size().columns - 2  # as argparse's formatter measures it
    serve = commands.add_parser(
        "serve",
        help="run the gateway (flags override GATEWAY_* variables and --config)",
        # Thirty flags: each is listed once, below, with its words.
        usage="%(prog)s [-h] [--config PATH] [--FLAG VALUE ...]",
        description=textwrap.fill(
            "Run the gateway. Each flag names its variable and its default; the settings without "
            "a flag are listed after them.",
            width,
        ),
        # Laid out here, not by argparse: the epilog holds two lists.
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    flagged: list[str] = []

    def setting(name: str, *, flag: str | None = None, **options: Any) -> None:
        """A flag of the setting ``name``, its help naming its variable and its default."""
        flagged.append(name)
        options.setdefault("metavar", _METAVARS.get(options.get("type")))
        serve.add_argument(flag or "--" + name.replace("_", "-"), dest=name, help=flag_help(name), **options)

    def switch(name: str) -> None:
        setting(name, action="store_const", const=True, default=None, metavar=None)

    serve.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help="YAML file of settings (env GATEWAY_CONFIG, default none)",
    )
    setting("upstream", metavar="URL")
    setting("host", metavar="ADDRESS")
    setting("port", type=int)
    setting("admin_host", metavar="ADDRESS")
    setting("admin_port", type=int)
    # No flag takes a secret itself: a command line is visible to every user of the machine.
    setting("admin_token_file", type=Path)
    setting("admin_open", metavar="LIST")
    setting("origin_header", metavar="NAME")
    setting("origin_secret_file", type=Path)
    setting("policies", type=Path, action="append", metavar="DIR")
    setting("body_limit", type=int)
    setting("response_limit", type=int)
    setting("connect_timeout", type=float)
    setting("read_timeout", type=float)
    setting("response_fields", flag="--response-field", action="append", metavar="PATH")
    setting("stream_holdback", type=int)
    setting("judge_url", metavar="URL")
    setting("judge_model", metavar="NAME")
    setting("judge_api_key_file", type=Path)
    setting("judge_timeout", type=float)
    setting("judge_max_concurrent", type=int)
    switch("judge_stream_hold")
    setting("redis_url", metavar="URL")
    setting("redis_timeout", type=float)
    setting("usage_journal", type=Path)
    setting("workspace_header", metavar="NAME")
    setting("workspace_lookup_pages", type=int)
    switch("quota_fail_closed")
    setting("log_format", choices=["json", "console"])
    setting("workers", type=int)
    setting("shutdown_timeout", type=float)
    setting("header_timeout", type=float)
    setting("max_connections", type=int)
    switch("watch_policies")
    for name, options in _PULL_FLAGS:
        setting(name, **options)
    setting("audit_file", type=Path)
    serve.epilog = settings_epilog(flagged, width)
    serve.set_defaults(run=_serve)


# Pulling the platform's policies again while serving (gateway/policy_repull.py).
_PULL_FLAGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("platform_url", {"metavar": "URL"}),
    ("platform_org", {"metavar": "ID"}),
    ("platform_workspaces", {"flag": "--platform-workspace", "action": "append", "metavar": "ID"}),
    ("platform_repos", {"flag": "--platform-repo", "action": "append", "metavar": "ID"}),
    ("platform_token_file", {"type": Path}),
    ("policies_pull_interval", {"type": float}),
    ("policies_pull_out", {"type": Path}),
)
# Every number of seconds of serve is a float, and only those are.
_METAVARS: dict[object, str] = {int: "N", float: "SECONDS", Path: "PATH"}


def _policy_paths(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dirs",
        nargs="*",
        type=Path,
        default=[Path("builtin")],
        metavar="DIR",
        help="policy directory or file; 'builtin' names the shipped pack (default: builtin)",
    )


def _policies_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policies",
        type=Path,
        action="append",
        metavar="DIR",
        help="policy directory or file (repeatable; default: the built-in pack)",
    )


def _judge_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "judge rules", "decide what only the judge can: from recorded verdicts, or a model (default: neither)"
    )
    source = group.add_mutually_exclusive_group()
    source.add_argument("--verdicts", type=Path, metavar="FILE", help="recorded verdicts to replay")
    source.add_argument("--judge-url", metavar="URL", help="an OpenAI-compatible endpoint (its base: .../v1)")
    group.add_argument("--judge-model", metavar="NAME", help="with --judge-url: the model to ask")
    group.add_argument(
        "--judge-api-key-file", type=Path, metavar="PATH", help="default: env GATEWAY_JUDGE_API_KEY"
    )
    group.add_argument("--record", type=Path, metavar="FILE", help="with --judge-url: keep verdicts in FILE")


@contextmanager
def _verdict_source(args: argparse.Namespace) -> Iterator[VerdictSource | None]:
    if args.judge_url is None:
        for flag in ("judge_model", "judge_api_key_file", "record"):
            if getattr(args, flag) is not None:
                raise VerdictSourceError([f"--{flag.replace('_', '-')} needs --judge-url"])
        yield None if args.verdicts is None else RecordedVerdicts.load(args.verdicts)
        return
    if not args.judge_model:
        raise VerdictSourceError(["--judge-url needs --judge-model"])
    api_key = read_api_key(args.judge_api_key_file, os.environ)
    with LiveVerdicts(JudgeSettings(args.judge_url, args.judge_model, api_key), args.record) as live:
        yield live


def _check(args: argparse.Namespace) -> int:
    rules, revision = load_rules(args.dirs)
    # Warnings load and serve; they are listed like errors, and the exit status stays 0.
    warnings = rule_warnings(rules)
    for warning in warnings:
        print(warning, file=sys.stderr)
    counted = f", {len(warnings)} warning(s)" if warnings else ""
    print(f"ok: {len(rules)} rules, revision {revision}{counted} {_checked(args.dirs)}")
    if args.holdback:
        holdback = plan_holdback(compile_ruleset(rules, revision), Stage.RESPONSE, args.stream_holdback)
        print(f"stream hold-back: at most {holdback.window} characters, {holdback.fixed} whatever the text")
        for rule in holdback.rules:
            print(f"  {rule.rule_id}: {rule.describe()}")
    return 0


def _checked(paths: Sequence[Path]) -> str:
    """What a run read, as given: an operator sees whether the shipped pack was among it."""
    return f"(policies: {', '.join(str(path) for path in paths)})"


def _test(args: argparse.Namespace) -> int:
    rules, _ = load_rules(args.dirs)
    with _verdict_source(args) as source:
        report = run_rule_tests(rules, None if source is None else source.complete)
    for failure in report.failures:
        print(f"FAIL {failure.describe()}")
    # Without a model a judge cannot decide: its cases are neither passed nor failed.
    for skipped in report.skipped:
        print(f"SKIP {skipped.describe()}")
    status = "FAILED" if report.failures else "ok"
    summary = f"{report.rules} rules, {report.cases} cases, {len(report.failures)} failures"
    if report.skipped:
        summary += f", {report.skipped_cases} skipped"
    if report.judged:
        summary += f", {report.judged} judged"
    print(f"{status}: {summary} {_checked(args.dirs)}")
    return 1 if report.failures else 0


def _explain(args: argparse.Namespace) -> int:
    ruleset = load_ruleset(args.policies or [BUILTIN_POLICY_DIR])
    text = sys.stdin.read() if args.text == "-" else args.text
    decision = evaluate(ruleset, Stage(args.stage), text)
    print(render_decision(decision))
    return 0


def render_decision(decision: Decision) -> str:
    """The decision with offsets and lengths only: explain output may be pasted anywhere."""
    pending = f", {len(decision.pending)} pending the judge" if decision.pending else ""
    lines = [
        f"decision: {decision.action.label} (stage {decision.stage.value}, "
        f"revision {decision.revision}, {len(decision.violations)} rule(s) matched{pending})"
    ]
    for v in decision.violations:
        shadow = f" (shadow: would {v.action.label})" if v.mode.value == "shadow" else ""
        lines.append(f"- {v.rule_id} [{v.severity.value}] {v.action.label}{shadow}: {v.name}")
        lines.extend(f"    span {s.start}-{s.end} ({s.length} chars)" for s in v.spans)
    # What the model would be asked: the rule's own words, shortened, never the text.
    for p in decision.pending:
        shadow = f" (shadow: would {p.action.label})" if p.mode.value == "shadow" else ""
        lines.extend(
            f"- pending judge: {check.key} [{p.severity.value}] {p.action.label}{shadow}: "
            f'"{textwrap.shorten(check.instruction, width=72, placeholder=" ...")}"'
            for check in p.checks
        )
    return "\n".join(lines)


def _serve(args: argparse.Namespace) -> int:
    config_file = args.config or (
        Path(os.environ["GATEWAY_CONFIG"]) if "GATEWAY_CONFIG" in os.environ else None
    )
    try:
        settings = load_settings(
            {name: getattr(args, name, None) for name in PARSERS}, os.environ, config_file
        )
    except ConfigError as exc:
        for error in exc.errors:
            print(f"gateway: {error}", file=sys.stderr)
        print(f"{len(exc.errors)} error(s): settings refused", file=sys.stderr)
        return 2
    # Checked here, once: a bad policy directory stops start-up with the `gateway check` listing.
    ruleset = load_ruleset(settings.policies or [BUILTIN_POLICY_DIR])
    configure_logging(settings.log_format)
    if settings.workers > 1:
        return serve_workers(settings)
    run_loop(run(settings, ruleset))
    return 0


def _usage(args: argparse.Namespace) -> int:
    url = args.redis_url or os.environ.get("REDIS_URL")
    if not url:
        print(
            "gateway: no Redis to read (--redis-url or REDIS_URL); with the in-memory store, "
            "ask the running gateway: GET /usage/WORKSPACE on its admin port",
            file=sys.stderr,
        )
        return 2
    period, now = Period(args.period), datetime.now(UTC)

    async def read() -> Totals:
        store = RedisUsageStore(url, timeout=2.0)
        try:
            return await store.totals(args.workspace, period, now)
        finally:
            await store.close()

    try:
        totals = asyncio.run(read())
    except StoreUnavailable:
        print(f"gateway: Redis at {url} did not answer", file=sys.stderr)
        return 1
    print(json.dumps(usage_body(args.workspace, period, now, totals)))
    return 0


def _eval(args: argparse.Namespace) -> int:
    ruleset = load_ruleset(args.policies or [BUILTIN_POLICY_DIR])
    with _verdict_source(args) as source:
        judge = None if source is None else source.complete
        report = eval_files(ruleset, args.files, min_action=args.min_action, judge=judge)
    print(report.to_json() if args.json else render_eval(report))
    if report.unjudged:
        # Said apart from the table: a text the judge never saw is not counted as passed.
        why = ", ".join(f"{kind}: {count}" for kind, count in sorted(report.unjudged.items()))
        hint = ": give --verdicts FILE or --judge-url URL --judge-model NAME"
        hint = hint if "no judge" in report.unjudged else ""
        print(f"gateway: {report.unjudged.total()} text(s) left unjudged ({why}){hint}", file=sys.stderr)
    return 0

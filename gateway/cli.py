"""The ``gateway`` command: serve, and check, test, explain and eval policies, and read usage."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from gateway import __version__
from gateway.app import run, usage_body
from gateway.audit import configure_logging
from gateway.config import PARSERS, ConfigError, load_settings
from gateway.evaluation import EvalInputError, eval_files, render_eval
from gateway.policy import (
    BUILTIN_POLICY_DIR,
    Decision,
    PolicyError,
    Stage,
    evaluate,
    load_rules,
    load_ruleset,
)
from gateway.policy.loader import rule_warnings
from gateway.policy.selftest import run_rule_tests
from gateway.runtime import run_loop
from gateway.usage.redis_store import RedisUsageStore
from gateway.usage.store import Period, StoreUnavailable, Totals
from gateway.workers import serve_workers


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{len(exc.problems)} error(s): policies refused", file=sys.stderr)
        return 1
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
    check.add_argument("dirs", nargs="+", type=Path, metavar="DIR")
    check.set_defaults(run=_check)

    test = commands.add_parser("test", help="run every rule's tests")
    test.add_argument("dirs", nargs="+", type=Path, metavar="DIR")
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
    evaluation.add_argument("files", nargs="+", type=Path, metavar="FILE.jsonl")
    evaluation.set_defaults(run=_eval)

    serve = commands.add_parser(
        "serve", help="run the gateway (flags override GATEWAY_* variables and --config)"
    )
    serve.add_argument("--config", type=Path, help="YAML file of settings (or GATEWAY_CONFIG)")
    serve.add_argument("--upstream", help="backend base URL (GATEWAY_UPSTREAM)")
    serve.add_argument("--host", help="public address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="public port (default 8080)")
    _admin_and_origin_options(serve)
    _policies_option(serve)
    serve.add_argument("--body-limit", type=int, help="bytes of a prompt request (default 1 MiB)")
    serve.add_argument("--response-limit", type=int, help="bytes of an answer held to inspect (8 MiB)")
    serve.add_argument("--connect-timeout", type=float, help="seconds to connect upstream (5)")
    serve.add_argument("--read-timeout", type=float, help="seconds between upstream bytes (300)")
    serve.add_argument(
        "--response-field",
        dest="response_fields",
        action="append",
        metavar="PATH",
        help="JSON field of an answer to evaluate, e.g. choices[].message.content (repeatable)",
    )
    serve.add_argument("--stream-holdback", type=int, help="most characters a stream is held back (256)")
    serve.add_argument("--redis-url", help="count usage in Redis (REDIS_URL); default: process memory")
    serve.add_argument("--redis-timeout", type=float, help="seconds a Redis call may take (0.25)")
    serve.add_argument(
        "--usage-journal",
        type=Path,
        metavar="PATH",
        help="keep usage not yet written to Redis at stop in PATH.<pid>, replayed at start",
    )
    serve.add_argument("--workspace-header", help="trusted header naming the workspace (off unless given)")
    serve.add_argument(
        "--workspace-lookup-pages", type=int, help="pages of GET /conversation a lookup reads (5)"
    )
    serve.add_argument(
        "--quota-fail-closed",
        action="store_const",
        const=True,
        default=None,
        help="refuse budgeted workspaces while Redis is down (default: serve them)",
    )
    serve.add_argument("--log-format", choices=["json", "console"], help="log lines (default json)")
    _serving_options(serve)
    serve.add_argument(
        "--watch-policies",
        action="store_const",
        const=True,
        default=None,
        help="reload when a policy file changes",
    )
    serve.add_argument("--audit-file", type=Path, help="also append violations to this JSON-lines file")
    serve.set_defaults(run=_serve)

    usage = commands.add_parser("usage", help="a workspace's token totals, read from Redis")
    usage.add_argument("workspace")
    usage.add_argument("--redis-url", help="default: REDIS_URL")
    usage.add_argument("--period", choices=["day", "month"], default="day")
    usage.set_defaults(run=_usage)
    return parser


def _admin_and_origin_options(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--admin-host", help="admin address (default 127.0.0.1)")
    serve.add_argument("--admin-port", type=int, help="admin port: /healthz, /readyz (default 9090)")
    # No flag takes a secret itself: a command line is visible to every user of the machine.
    serve.add_argument(
        "--admin-token-file",
        type=Path,
        metavar="PATH",
        help="file holding the admin port's bearer token, read again when it changes "
        "(or GATEWAY_ADMIN_TOKEN; default: no token)",
    )
    serve.add_argument(
        "--admin-open",
        metavar="LIST",
        help="admin endpoints served without the token, comma-separated (default healthz,readyz,metrics)",
    )
    serve.add_argument(
        "--origin-header",
        metavar="NAME",
        help="header carrying the origin secret upstream (default X-Gateway-Origin)",
    )
    serve.add_argument(
        "--origin-secret-file",
        type=Path,
        metavar="PATH",
        help="file holding the secret added to every upstream request (or GATEWAY_ORIGIN_SECRET)",
    )


def _serving_options(serve: argparse.ArgumentParser) -> None:
    """Processes, and how long and how many clients each holds."""
    serve.add_argument("--workers", type=int, help="processes serving the same ports (default 1)")
    serve.add_argument("--shutdown-timeout", type=float, help="seconds to finish requests on SIGTERM (30)")
    serve.add_argument(
        "--header-timeout", type=float, help="seconds a client has to send a request head (10)"
    )
    serve.add_argument(
        "--max-connections", type=int, help="open client connections per worker; more get 503 (10000)"
    )


def _policies_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policies",
        type=Path,
        action="append",
        metavar="DIR",
        help="policy directory or file (repeatable; default: the built-in pack)",
    )


def _check(args: argparse.Namespace) -> int:
    rules, revision = load_rules(args.dirs)
    # Warnings load and serve; they are listed like errors, and the exit status stays 0.
    warnings = rule_warnings(rules)
    for warning in warnings:
        print(warning, file=sys.stderr)
    counted = f", {len(warnings)} warning(s)" if warnings else ""
    print(f"ok: {len(rules)} rules, revision {revision}{counted}")
    return 0


def _test(args: argparse.Namespace) -> int:
    rules, _ = load_rules(args.dirs)
    report = run_rule_tests(rules)
    for failure in report.failures:
        print(f"FAIL {failure.describe()}")
    status = "FAILED" if report.failures else "ok"
    print(f"{status}: {report.rules} rules, {report.cases} cases, {len(report.failures)} failures")
    return 1 if report.failures else 0


def _explain(args: argparse.Namespace) -> int:
    ruleset = load_ruleset(args.policies or [BUILTIN_POLICY_DIR])
    text = sys.stdin.read() if args.text == "-" else args.text
    decision = evaluate(ruleset, Stage(args.stage), text)
    print(render_decision(decision))
    return 0


def render_decision(decision: Decision) -> str:
    """The decision with offsets and lengths only: explain output may be pasted anywhere."""
    lines = [
        f"decision: {decision.action.label} (stage {decision.stage.value}, "
        f"revision {decision.revision}, {len(decision.violations)} rule(s) matched)"
    ]
    for v in decision.violations:
        shadow = f" (shadow: would {v.action.label})" if v.mode.value == "shadow" else ""
        lines.append(f"- {v.rule_id} [{v.severity.value}] {v.action.label}{shadow}: {v.name}")
        lines.extend(f"    span {s.start}-{s.end} ({s.length} chars)" for s in v.spans)
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
    report = eval_files(ruleset, args.files, min_action=args.min_action)
    print(report.to_json() if args.json else render_eval(report))
    return 0

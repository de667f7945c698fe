"""``gateway policies pull``: the platform's policies into a policy file, replaced only when good.

One ``GET /policy`` per scope the operator chose (the org, then each workspace and repo), every
answer validated (``gateway.platform_policies``), the file written beside the old one and renamed
over it only once it loads into a rule set. Any failure leaves the last good file as it was.
No message holds the token or a policy's text.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from gateway.credentials import parse_secret, read_secret_file
from gateway.platform_policies import PlatformAnswerError, PolicyDocument, merge_policies, parse_answer
from gateway.policy import PolicyError, load_ruleset
from gateway.policy.model import Action
from gateway.usage.journal import fsync_directory

DEFAULT_TOKEN_ENV = "GATEWAY_PLATFORM_TOKEN"
DEFAULT_TIMEOUT = 30.0
MAX_ANSWER_BYTES = 16 << 20


class PullError(Exception):
    """A pull that wrote nothing; the message holds no token and no policy text."""


def policy_endpoint(url: str) -> URL:
    """``{url}/policy``; a URL holding credentials is refused (the token travels in a header)."""
    try:
        base = URL(url)
    except ValueError:
        raise PullError("the platform URL is not a URL") from None
    # SECURITY: the URL is written into the file's header and messages; it must hold no secret.
    if base.user is not None or base.password is not None:
        raise PullError("the platform URL must not hold a user or password: give the token apart")
    if base.query_string or base.fragment:
        raise PullError("the platform URL must not hold a query or a fragment")
    if base.scheme not in {"http", "https"} or not base.host:
        raise PullError("the platform URL must be http:// or https:// with a host")
    return base.with_path(base.path.rstrip("/") + "/policy")


async def pull(
    url: str,
    org: str,
    workspaces: Sequence[str],
    repos: Sequence[str],
    token: str,
    session: aiohttp.ClientSession,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> PolicyDocument:
    """The policies of the org and of each workspace and repo listed, one rule per policy id."""
    endpoint = policy_endpoint(url)
    queries = [
        {"orgId": org},
        *({"orgId": org, "workspaceId": workspace} for workspace in workspaces),
        *({"orgId": org, "repoId": repo} for repo in repos),
    ]
    answers = []
    for query in queries:
        asked = "GET /policy?" + "&".join(f"{key}={value}" for key, value in query.items())
        answer = await _get(session, endpoint.with_query(query), token, timeout, asked)
        try:
            answers.append(parse_answer(answer, org=org))
        except PlatformAnswerError as exc:
            raise PullError(f"{asked}: {exc}") from None
    try:
        policies = merge_policies(answers)
    except PlatformAnswerError as exc:
        raise PullError(str(exc)) from None
    scopes = (
        f"org {org}",
        *(f"workspace {workspace}" for workspace in workspaces),
        *(f"repo {repo}" for repo in repos),
    )
    return PolicyDocument(policies, str(endpoint), scopes, datetime.now(UTC))


async def _get(session: aiohttp.ClientSession, url: URL, token: str, timeout: float, asked: str) -> Any:
    try:
        async with session.get(
            url,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            # A redirect would carry the token elsewhere, or lose it: neither is an answer.
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            if response.status != 200:
                raise PullError(f"{asked}: HTTP {response.status} {response.reason or ''}".rstrip())
            body = bytearray()
            async for chunk in response.content.iter_any():
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    raise PullError(f"{asked}: the answer is over {MAX_ANSWER_BYTES} bytes")
    except TimeoutError:
        raise PullError(f"{asked}: no answer within {timeout:g} s") from None
    except aiohttp.ClientError as exc:
        raise PullError(f"{asked}: cannot reach the platform ({type(exc).__name__})") from None
    try:
        return json.loads(body)
    except ValueError:
        raise PullError(f"{asked}: the answer is not JSON") from None


def write_policy_file(path: Path, document: PolicyDocument) -> bool:
    """Replace ``path`` with the document once it loads into a rule set; False when the
    policies are those the file already holds (the file, and so the revision, stay as they are)."""
    try:
        existing = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        existing, mode = None, 0o644
    except (OSError, UnicodeDecodeError) as exc:
        raise PullError(f"cannot read {path}: {_reason(exc)}") from None
    if existing is not None and _without_header(existing) == document.body:
        return False
    # Beside the target, so the rename is atomic; not *.yaml, so a policy directory being
    # watched never sees it.
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise PullError(f"cannot write in {path.parent}: {_reason(exc)}") from None
    temporary = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(document.text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, mode)
        _check_loads(temporary, document)
        os.replace(temporary, path)
    except OSError as exc:
        raise PullError(f"cannot write {path}: {_reason(exc)}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    fsync_directory(path.parent)
    return True


def _check_loads(written: Path, document: PolicyDocument) -> None:
    try:
        ruleset = load_ruleset([written])
    except PolicyError as exc:
        # The loader's messages name rules and keys, not the instructions.
        first = exc.problems[0]
        raise PullError(
            f"the policies would not load ({len(exc.problems)} problem(s); first: {first.rule_id or '-'}: "
            f"{first.message})"
        ) from None
    if len(ruleset.rules) != len(document.policies):
        raise PullError(f"{len(document.policies)} policies pulled, but {len(ruleset.rules)} rules loaded")


def _without_header(text: str) -> str:
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    return "".join(lines[start:])


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or type(exc).__name__


def summary(document: PolicyDocument, path: Path, written: bool) -> str:
    actions = document.actions()
    count = len(document.policies)
    counts = ", ".join(
        f"{actions[action]} {action.label}" for action in (Action.BLOCK, Action.ALERT, Action.LOG)
    )
    unchanged = "" if written else " (unchanged)"
    return f"{count} {'policy' if count == 1 else 'policies'}: {counts} → {path}{unchanged}"


# The command.


def add_policies_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    policies = commands.add_parser("policies", help="import the platform's policies as judge rules")
    actions = policies.add_subparsers(required=True, metavar="ACTION")
    command = actions.add_parser(
        "pull",
        help="write the platform's policies (GET /policy) to a policy file of judge rules",
        description="Write the platform's policies (GET /policy) to a policy file of judge rules. "
        "A bad answer leaves the file as it was; the token is read from a variable or a file, "
        "never from the command line.",
    )
    command.add_argument("--platform-url", required=True, metavar="URL", help="the platform API's base URL")
    command.add_argument("--org", required=True, metavar="ID", help="the org whose policies to pull")
    command.add_argument(
        "--workspace", action="append", default=[], metavar="ID", help="also a workspace's (repeatable)"
    )
    command.add_argument(
        "--repo", action="append", default=[], metavar="ID", help="also a repo's (repeatable)"
    )
    command.add_argument("--out", required=True, type=Path, metavar="FILE", help="the policy file to write")
    token = command.add_mutually_exclusive_group()
    token.add_argument(
        "--token-env",
        default=DEFAULT_TOKEN_ENV,
        metavar="NAME",
        help="variable holding the platform's bearer token (default %(default)s)",
    )
    token.add_argument("--token-file", type=Path, metavar="PATH", help="file holding the bearer token")
    command.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS", help="per call (%(default)s)"
    )
    command.set_defaults(run=_pull_command)


def read_token(variable: str, file: Path | None) -> str:
    """The bearer token from a file, else from a variable; no message holds the token or the path."""
    try:
        if file is not None:
            return read_secret_file(file)
        if variable not in os.environ:
            raise PullError(f"no token: {variable} is not set (or give --token-file)")
        return parse_secret(os.environ[variable])
    except ValueError as exc:
        source = "--token-file" if file is not None else variable
        raise PullError(f"the token ({source}) {exc}") from None


def _pull_command(args: argparse.Namespace) -> int:
    out: Path = args.out
    try:
        token = read_token(args.token_env, args.token_file)
        document = asyncio.run(_pull(args, token))
        written = write_policy_file(out, document)
    except PullError as exc:
        kept = f"kept the last good {out}" if out.exists() else f"{out} not written"
        print(f"gateway: policies pull: {exc}; {kept}", file=sys.stderr)
        return 1
    print(summary(document, out, written))
    return 0


async def _pull(args: argparse.Namespace, token: str) -> PolicyDocument:
    async with aiohttp.ClientSession() as session:
        return await pull(
            args.platform_url, args.org, args.workspace, args.repo, token, session, timeout=args.timeout
        )

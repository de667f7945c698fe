"""The commands ``gateway demo`` prints once it serves: each shows one thing the gateway does."""

from __future__ import annotations

from dataclasses import dataclass

# Any bearer token: the stand-in checks none, and the gateway needs one to look up (with the
# caller's own credentials) which workspace a conversation belongs to.
AUTH = "-H 'Authorization: Bearer demo'"
LAST_LINE = "Ctrl-C stops the gateway and the stand-in backend."


@dataclass(frozen=True, slots=True)
class Example:
    what: str  # printed as a comment above the command
    command: str


def examples(port: int, admin_port: int) -> list[Example]:
    prompt = f"curl -s localhost:{port}/conversation/c1/prompt {AUTH}"
    return [
        Example(
            "an allowed prompt: forwarded, and the backend's answer comes back",
            f"""{prompt} --json '{{"prompt":"Summarise our release notes"}}' -w '\\n'""",
        ),
        Example(
            "a prompt carrying a credential: 403 POLICY_BLOCKED, the backend never sees it",
            f"""{prompt} --json '{{"prompt":"deploy with AKIAIOSFODNN7EXAMPLE"}}' -w '\\n'""",
        ),
        Example(
            "a streamed answer: server-sent events, each read before it is let go",
            f"""{prompt} -N --json '{{"prompt":"How do streams work?","stream":true}}'""",
        ),
        Example(
            "an answer carrying a secret: 403 RESPONSE_BLOCKED on its way back",
            f"""{prompt} --json '{{"prompt":"What is the deploy key?"}}' -w '\\n'""",
        ),
        Example(
            "the same answer streamed: the stream ends with an error event, the secret never sent",
            f"""{prompt} -N --json '{{"prompt":"What is the deploy key?","stream":true}}'""",
        ),
        Example(
            "the conversation's messages: the one carrying the secret is withheld",
            f"curl -s localhost:{port}/conversation/c1/messages {AUTH} -w '\\n'",
        ),
        Example(
            "why a text is blocked (offsets and lengths, never the text), no server needed",
            ".venv/bin/gateway explain 'deploy with AKIAIOSFODNN7EXAMPLE'",
        ),
        Example(
            "the admin port: the workspace's token usage today, and the decisions counted",
            f"curl -s localhost:{admin_port}/usage/demo -w '\\n'",
        ),
        Example(
            "",
            f"curl -s localhost:{admin_port}/metrics | grep '^policy_gateway_decisions_total'",
        ),
    ]


def tour(port: int, admin_port: int, backend_port: int) -> str:
    """The block printed once both servers answer."""
    lines = [
        "",
        f"Demo ready: the gateway on localhost:{port} (admin: localhost:{admin_port}) with the "
        f"built-in policy pack,",
        f"in front of a stand-in backend on localhost:{backend_port}. Try, in another terminal:",
    ]
    for example in examples(port, admin_port):
        if example.what:
            lines += ["", f"# {example.what}"]
        lines.append(example.command)
    lines += ["", LAST_LINE, ""]
    return "\n".join(lines)

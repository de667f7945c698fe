"""``gateway demo``: see the gateway at work with nothing else running (see gateway.demo.command)."""

from gateway.demo.command import add_demo_parser

__all__ = ["add_demo_parser"]

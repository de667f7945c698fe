"""ai-policy-gateway: a policy-enforcement gateway for AI conversation APIs."""

__version__ = "0.1.0"

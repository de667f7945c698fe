"""Token accounting: counting tokens, storing usage per workspace, resolving workspaces."""

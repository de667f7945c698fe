"""Natural-language rules judged by a model: the client, the verdict cache and the import of the
platform's policies."""

"""Serving integrations (embedded speculative server, SGLang). Installed as ``draftdistill.serving``."""

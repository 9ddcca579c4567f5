"""Adapters that let a training stack read a packprep build in place (no export): one module per stack, each
importing that stack only when it is imported itself (`packprep.integrations.torchtitan`)."""

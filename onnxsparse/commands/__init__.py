"""CLI commands, one module each; ``onnxsparse.cli`` adds every module's ``command``."""

"""``python -m onnxsparse`` runs the CLI."""

from onnxsparse.cli import main

main()

"""The passes, one module each; installed as ``onnxsparse.passes``. The registry discovers them here."""

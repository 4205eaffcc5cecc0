"""TensorRT: the lazy builder, trtexec command emission and build-log parsing."""

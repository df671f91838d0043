"""fedlora's gRPC API, version 1: code generated from ``protos/fedlora/v1/*.proto``.

Do not edit the ``*_pb2*`` modules: change the protos and run
``python scripts/gen_protos.py`` (``--check`` tells whether they are stale).
"""

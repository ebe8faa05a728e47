"""GENERATED CODE: gRPC stubs of containerd's API, from our own ``*.proto`` files here.

Do not edit the ``*_pb2*.py`` files by hand; regenerate them (needs ``grpcio-tools``) with

    python -m overlaybd_py.snapshotter._proto.generate

The ``.proto`` files are ours, written from containerd's API documentation; only the wire
facts (package, service, method, message and field names and numbers) match containerd's.
"""

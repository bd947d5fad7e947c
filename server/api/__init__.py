"""The wire's face: gRPC servicers (``servicer``: inference, repository, trace settings; their error mapping in
``rpc``), the protobuf tensor codec (``codec``) and the HTTP routes (``http``: health, ``/metrics``). A message
arrives here and leaves here; below this room nothing should see protobuf or JSON. Imports point down: ``inference``,
``models``, and the leaves ``observability`` and ``config``."""

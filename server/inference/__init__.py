"""One request's journey (``call``): resolve the model version, look in the result cache (``cache``), run it at
once or queue it for a batch, answer. Reading ``call`` explains a request end to end. Imports point down:
``models``, and the leaves ``observability`` and ``config``. (``call`` still calls ``api.codec`` to decode and encode
protobuf: the one upward import, to move into ``api`` so that REST shares this path.)"""

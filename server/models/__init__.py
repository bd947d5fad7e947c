"""Models and their versions: the repository (``repository``: scan, load, unload, version policy), one loaded
version (``model``: its onnxruntime session, its batcher and executor), Triton's ``config.pbtxt`` (``modelconfig``),
preprocessing pipelines (``preprocess``), dynamic batching (``batching``: a version owns its batcher, so it lives
here) and the worker threads that run batches (``executor``). Imports point down: ``kernels``, and the leaves
``observability`` and ``config``."""

"""``kiln serve``: a trained model behind an HTTP API (FastAPI + uvicorn, the ``serve`` extra).

Rooms: :mod:`~kiln.serve.settings` (the flags, declared once), :mod:`~kiln.serve.schemas` (what a
request may hold, and the OpenAPI description of it), :mod:`~kiln.serve.batcher` (concurrent requests
gathered into token-budget batches, inference on one worker thread), :mod:`~kiln.serve.metrics`
(Prometheus text), :mod:`~kiln.serve.app` (the FastAPI application) and :mod:`~kiln.serve.server`
(uvicorn: listening, start-up line, graceful shutdown). ``kiln --help`` imports only ``settings``;
FastAPI is imported when ``kiln serve`` runs.
"""

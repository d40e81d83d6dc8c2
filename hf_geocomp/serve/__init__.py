"""``hf-geocomp serve``: a base and a compressed model side by side over HTTP (the ``serve`` extra).

* :mod:`.config`: :class:`ServeConfig`, the command's flags and the limits every request meets.
* :mod:`.engine`: one served model: loading (:func:`hf_geocomp.data.load_model`), chat templates, generation
  through its own KV cache (a compressed folder's coded cache), seeded sampling, perplexity.
* :mod:`.app`: the FastAPI app (page, /generate, /score, /models, /health); :mod:`.openai_api`: the
  OpenAI-compatible /v1 routes; :mod:`.limits`: body size, concurrent requests, the shape of errors.

Importing this package imports neither FastAPI nor uvicorn; :func:`hf_geocomp.serve.cli.build` does.
"""

from .config import ServeConfig

__all__ = ["ServeConfig"]

"""cpm-serve: OpenAI-compatible HTTP routes over the engine (``routes``), the uvicorn app (``app``,
needs the ``[serve]`` extra), a Ray Serve deployment (``ray_app``, ``[ray]``) and the server's
settings (``config``). Never imports exporter or optimize."""

"""Offline jobs on the engine: prompt files and OpenAI batch files (``offline``, ``offline_formats``)
and their distribution over a Ray cluster (``ray_job``, needs the ``[ray]`` extra)."""

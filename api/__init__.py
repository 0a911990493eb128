"""OpenAI's completions API over the engine: the request schema, a body's rules and the response
shapes. The HTTP routes (``serve``) and OpenAI batch files (``jobs``) both answer through it, so a
batch line gets exactly what the server would. Nothing here knows of HTTP."""

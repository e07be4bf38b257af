"""User-facing layers over the library: the CLI, the OpenAI-compatible server, the notebook pipeline."""

"""OpenAI-compatible HTTP server (FastAPI + uvicorn) around an AsyncLLMEngine, as vLLM serves it.

`build_app(EngineArgs(...))` gives the FastAPI app; `python -m jaxpaged.server` / `jaxpaged serve` run it.
"""

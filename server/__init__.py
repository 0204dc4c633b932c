"""OpenAI-compatible HTTP server (FastAPI + uvicorn) around an AsyncLLMEngine."""

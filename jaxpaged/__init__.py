"""jaxpaged: a PagedAttention LLM serving engine on JAX and Pallas with vLLM's API.

Names are imported lazily so that `jaxpaged.kernels` and `jaxpaged.models` load without the engine.
"""

import importlib

_EXPORTS = {
    "LLM": "jaxpaged.llm",
    "EngineArgs": "jaxpaged.config",
    "SamplingParams": "jaxpaged.sampling_params",
    "RequestOutputKind": "jaxpaged.sampling_params",
    "RequestOutput": "jaxpaged.outputs",
    "CompletionOutput": "jaxpaged.outputs",
    "Logprob": "jaxpaged.outputs",
    "BeamSearchParams": "jaxpaged.beam_search",
    "BeamSearchOutput": "jaxpaged.beam_search",
    "BeamSearchSequence": "jaxpaged.beam_search",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxpaged' has no attribute {name!r}")

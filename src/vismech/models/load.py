"""Turn a ``--model`` string into a loaded ``VLM``.

Accepted forms: ``tiny:FAMILY`` (tiny random model of the real class, for tests), ``random:PRESET`` (real-size
architecture with random weights, for timing and memory), ``organism`` / ``organism-llava`` (the trained model
organisms shipped inside vismech), and any HF hub id or local checkpoint directory. Loading is safe by default:
no remote code unless asked for, safetensors or ``weights_only`` loading only.

Prompts are framed as ``models.framing`` describes (the checkpoint's own chat template where it ships one).
``prompt_format="auto"`` (the default) frames vismech's own models in chat form, the form they were built and
trained with; for any other checkpoint it measures first-answer accuracy in both forms on a small fixed set
(``answers.format_accuracy``) and takes the better (chat on a tie). The choice and its numbers are on
``VLM.prompt_format_choice`` and in every run's manifest.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .families import FAMILIES, family_for_config
from .vlm import VLM

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}

ORGANISMS = {"organism": "qwen2_5_vl", "organism-llava": "llava", "organism-ids": "qwen2_5_vl"}


def organism_dir(name: str) -> Path:
    return Path(__file__).resolve().parent.parent / "organisms" / name


def checkpoint_path(name: str) -> str:
    """The shipped folder of organism ``name``, else ``name`` as given (a folder or hub id)."""
    return str(organism_dir(name)) if name in ORGANISMS else name


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16")
    return DTYPES[dtype]


def load_vlm(name: str, dtype: str | torch.dtype | None = "fp32", device: str | None = None,
             device_map: str | dict | None = None, prompt_format: str | None = "auto", trust_remote_code: bool = False,
             seed: int = 0) -> VLM:
    """Load ``name`` (see the module docstring) as a ``VLM`` in eval mode."""
    prompt_format = prompt_format or "auto"
    if prompt_format not in ("auto", "chat", "plain"):
        raise ValueError(f"prompt_format must be auto, chat or plain, not {prompt_format!r}")
    vlm = _load(name, dtype, device, device_map, prompt_format, trust_remote_code, seed)
    if prompt_format != "auto":
        vlm.prompt_format_choice = {"prompt_format": prompt_format, "chosen_by": "given"}
    elif vlm.framing.vismech:
        vlm.prompt_format_choice = {"prompt_format": "chat", "chosen_by": "vismech's own model: the form it was "
                                    "built and trained with"}
    else:
        from .answers import format_accuracy

        acc = format_accuracy(vlm)
        vlm.prompt_format = "plain" if acc["plain"] > acc["chat"] else "chat"
        vlm.prompt_format_choice = {"prompt_format": vlm.prompt_format, "chosen_by": "first-answer accuracy",
                                    "accuracy": acc}
    return vlm


def _load(name, dtype, device, device_map, prompt_format, trust_remote_code, seed) -> VLM:
    prompt_format = "chat" if prompt_format == "auto" else prompt_format
    dt = resolve_dtype(dtype)
    if device is None:
        from vismech.distributed import default_device

        device = default_device()
    if name.startswith("tiny:"):
        from .tiny import build_tiny

        fam = name.split(":", 1)[1]
        if fam not in FAMILIES:
            raise ValueError(f"unknown family {fam!r} in {name!r}; choose one of {', '.join(sorted(FAMILIES))}")
        model, tok = build_tiny(fam, seed=seed)
        model = model.to(device=device, dtype=dt)
        spec = family_for_config(model.config)
        return VLM(model, tok, spec.image_processor_for(model.config), spec, name, prompt_format)
    if name.startswith("random:"):
        from .presets import PRESETS
        from .random_weights import random_model
        from .wordtok import build_word_tokenizer

        preset = name.split(":", 1)[1]
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        tok = build_word_tokenizer(family=PRESETS[preset].family)
        config = PRESETS[preset].config()
        _use_tokenizer(config, tok)
        spec = family_for_config(config)
        model = random_model(config, dt, device, device_map, seed)
        return VLM(model, tok, spec.image_processor_for(config), spec, name, prompt_format)
    path = checkpoint_path(name)
    if name in ORGANISMS and not (Path(path) / "config.json").exists():
        raise ValueError(f"the {name} checkpoint is missing from this install ({path}); reinstall vismech")
    return _load_pretrained(path, name, dt, device, device_map, prompt_format, trust_remote_code)


def _use_tokenizer(config, tok) -> None:
    """Point a random-weight config's special-token ids at vismech's word tokenizer (it has no real one)."""
    ids = tok.convert_tokens_to_ids
    names = {"image_token_id": "<|image_pad|>" if "qwen" in config.model_type else "<image>",
             "video_token_id": "<|video_pad|>" if "qwen" in config.model_type else "<video>",
             "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
    for attr, token in names.items():
        if hasattr(config, attr):
            setattr(config, attr, ids(token))


def geometry_for(name: str):
    """The token geometry of ``name`` (a family, or anything ``load_vlm`` takes) without loading weights."""
    from transformers import AutoConfig

    from .families import DEFAULT_GEOMETRY

    if name in DEFAULT_GEOMETRY:
        return DEFAULT_GEOMETRY[name]
    if name.startswith("tiny:"):
        from .tiny import tiny_config

        cfg = tiny_config(name.split(":", 1)[1])
    elif name.startswith("random:"):
        from .presets import PRESETS

        cfg = PRESETS[name.split(":", 1)[1]].config()
    else:
        path = checkpoint_path(name)
        try:
            cfg = AutoConfig.from_pretrained(path)
        except OSError as e:
            raise ValueError(f"cannot read the config of {name!r}; pass a family name ({', '.join(FAMILIES)}), "
                             "tiny:FAMILY, or a local checkpoint directory") from e
    spec = family_for_config(cfg)
    return spec.geometry(cfg, spec.image_processor_for(cfg))


def _load_pretrained(path, name, dtype, device, device_map, prompt_format, trust_remote_code) -> VLM:
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    local = os.path.isdir(path)
    if not local and (os.sep in path and not path.count("/") == 1):
        raise ValueError(f"model path {path!r} does not exist")
    if local and not (Path(path) / "config.json").exists():
        raise ValueError(f"cannot load model {name!r}: the directory has no config.json; pass a checkpoint "
                         "directory saved with save_pretrained")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        where = "the directory has no config.json" if local else (
            "it is not in the local HF cache and the hub cannot be reached (offline?)")
        raise ValueError(f"cannot load model {name!r}: {where}. Pass a local checkpoint directory, or download "
                         f"it first with `huggingface-cli download {name}`") from e
    spec = family_for_config(config)
    if local and not any(Path(path).glob("*.safetensors")) and not any(Path(path).glob("*.bin")):
        raise ValueError(f"model directory {path!r} has a config but no weights (*.safetensors); copy the weight "
                         "files into it")
    kw = dict(dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=None)
    if device_map is not None:
        from vismech.distributed import max_memory

        kw["device_map"] = device_map
        budget = max_memory() if isinstance(device_map, str) else None
        if budget:
            kw["max_memory"] = budget  # this process's GPUs only when torchrun starts several
    try:
        model = spec.model_class().from_pretrained(path, **kw)
    except OSError as e:
        raise ValueError(f"cannot load the weights of {name!r}: {e}".splitlines()[0]) from e
    if device_map is None:
        model = model.to(device)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    try:
        proc = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        proc = spec.image_processor_for(config)
    from .framing import framing_for

    vlm = VLM(model, tok, proc, spec, name, prompt_format, framing=framing_for(path, tok, spec))
    if local:
        from .ground_truth import find_ground_truth

        gt = find_ground_truth(path)
        vlm.ground_truth = gt.check(vlm.n_layers, vlm.n_heads, f"{name}'s ground_truth.json") if gt else None
    return vlm

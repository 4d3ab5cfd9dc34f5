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
import pickle
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError

from vismech.errors import UserError

from .families import FAMILIES, family_for_config
from .vlm import VLM

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}

ORGANISMS = {"organism": "qwen2_5_vl", "organism-llava": "llava", "organism-ids": "qwen2_5_vl",
             "organism-llava-ids": "llava"}


def organism_dir(name: str) -> Path:
    return Path(__file__).resolve().parent.parent / "checkpoints" / name


def checkpoint_path(name: str) -> str:
    """The shipped folder of organism ``name``, else ``name`` as given (a folder or hub id)."""
    return str(organism_dir(name)) if name in ORGANISMS else name


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16")
    return DTYPES[dtype]


def resolve_device(device: str | None) -> str:
    """``device`` (cpu, cuda, cuda:N, mps) checked against this machine, or the default one; ``UserError`` for a
    device that does not exist here."""
    from vismech.distributed import default_device

    if device is None:
        return default_device()
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if d.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UserError(f"device {device!r}: this machine has no CUDA GPU that torch {torch.__version__} can use; "
                            "use --device cpu")
        if d.index is not None and d.index >= n:
            raise UserError(f"device {device!r}: this machine has {n} GPU(s), cuda:0 to cuda:{n - 1}")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {device!r} is not available on this machine; use --device cpu")
    elif d.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"vismech runs on cpu, cuda or mps, not {device!r}")
    return device


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
    device = resolve_device(device)
    if name.startswith("tiny:"):
        from .tiny import build_tiny

        fam = name.split(":", 1)[1]
        if fam not in FAMILIES:
            raise UserError(f"unknown family {fam!r} in {name!r}; choose one of {', '.join(sorted(FAMILIES))}")
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
            raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        tok = build_word_tokenizer(family=PRESETS[preset].family)
        config = PRESETS[preset].config()
        spec = family_for_config(config)
        _use_tokenizer(config, tok, spec)
        model = random_model(config, dt, device, device_map, seed)
        return VLM(model, tok, spec.image_processor_for(config), spec, name, prompt_format)
    path = checkpoint_path(name)
    if name in ORGANISMS and not (Path(path) / "config.json").exists():
        raise UserError(f"the {name} checkpoint is missing from this install ({path}); reinstall vismech")
    return _load_pretrained(path, name, dt, device, device_map, prompt_format, trust_remote_code)


def _use_tokenizer(config, tok, spec) -> None:
    """Point a random-weight config's special-token ids (the family's ``config_tokens``) at vismech's word
    tokenizer (it has no real one)."""
    ids = tok.convert_tokens_to_ids
    for attr, token in spec.config_tokens.items():
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
            raise UserError(f"cannot read the config of {name!r}; pass a family name ({', '.join(FAMILIES)}), "
                            "tiny:FAMILY, or a local checkpoint directory") from e
    spec = family_for_config(cfg)
    return spec.geometry(cfg, spec.image_processor_for(cfg))


def _hub_reachable(repo_id: str, timeout: float = 3.0) -> bool:
    """Whether the HF hub (or the https proxy in the environment) answers a TCP connection within ``timeout``
    seconds; False in offline mode. Without this check an unreachable hub costs ~40 s of retries per file."""
    import socket
    import urllib.parse
    import urllib.request

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    target = urllib.parse.urlsplit(urllib.request.getproxies().get("https") or constants.ENDPOINT)
    try:
        socket.create_connection((target.hostname, target.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_pretrained(path, name, dtype, device, device_map, prompt_format, trust_remote_code) -> VLM:
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    local = os.path.isdir(path)
    if not local and (os.sep in path and not path.count("/") == 1):
        raise UserError(f"model path {path!r} does not exist")
    if local and not (Path(path) / "config.json").exists():
        raise UserError(f"cannot load model {name!r}: the directory has no config.json; pass a checkpoint "
                        "directory saved with save_pretrained")
    hub = {} if local or _hub_reachable(path) else {"local_files_only": True}  # offline: no retries
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **hub)
    except ValueError as e:
        raise UserError(f"cannot load model {name!r}: its config.json cannot be read ({e})".splitlines()[0]) from e
    except OSError as e:
        where = "the directory has no config.json" if local else (
            "it is not in the local HF cache and the hub cannot be reached (offline?)" if hub else
            "the hub has no such model, or it needs `huggingface-cli login`")
        raise UserError(f"cannot load model {name!r}: {where}. Pass a local checkpoint directory, or download "
                        f"it first with `huggingface-cli download {name}`") from e
    spec = family_for_config(config)
    if local and not any(Path(path).glob("*.safetensors")) and not any(Path(path).glob("*.bin")):
        raise UserError(f"model directory {path!r} has a config but no weights (*.safetensors); copy the weight "
                        "files into it")
    kw = dict(dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=None, **hub)
    if device_map is not None:
        from vismech.distributed import max_memory

        kw["device_map"] = device_map
        budget = max_memory() if isinstance(device_map, str) else None
        if budget:
            kw["max_memory"] = budget  # this process's GPUs only when torchrun starts several
    try:
        with warnings.catch_warnings():  # torch's note on a foreign pickle's protocol precedes our own message
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            model = spec.model_class().from_pretrained(path, **kw)
    except (OSError, SafetensorError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load the weights of {name!r}: {first}; the weight files are damaged or incomplete, "
                        "copy or download them again") from e
    except pickle.UnpicklingError as e:
        raise UserError(f"the weights of {name!r} are a pickle that holds more than tensors, and torch refuses to "
                        "run it (weights_only); vismech loads only plain tensors: use safetensors weights") from e
    if device_map is None:
        model = model.to(device)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **hub)
    tok.padding_side = "left"
    try:
        proc = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **hub)
    except (OSError, ValueError):
        proc = spec.image_processor_for(config)
    from .framing import framing_for

    vlm = VLM(model, tok, proc, spec, name, prompt_format, framing=framing_for(path, tok, spec))
    if local:
        from .ground_truth import find_ground_truth

        gt = find_ground_truth(path)
        vlm.ground_truth = gt.check(vlm.n_layers, vlm.n_heads, f"{name}'s ground_truth.json") if gt else None
    return vlm

"""Models with random weights drawn where they will live: one GPU, or several through a device map.

``random_model(config, ...)`` builds the module tree without parameter storage and draws every parameter directly
on its device, so a 32B model sharded over two GPUs never passes through one device or the CPU, and the draws are
the same however the model is split (each depends on the seed and the parameter's name only). This is what the
``random:PRESET`` models of ``models.load`` are: real-size architectures for timing and memory, meaningless for
science. ``device_map="auto"`` uses accelerate (the ``multi-gpu`` extra) over this process's GPUs
(``distributed.process_gpus``), so data and model parallelism combine under torchrun.
"""

from __future__ import annotations

import torch

from vismech.errors import UserError


def build_random(name: str, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                 device_map: str | dict | None = None, seed: int = 0) -> torch.nn.Module:
    """``...ForConditionalGeneration`` of preset ``name`` (``models.presets``; ``random:`` prefix allowed) with
    random weights (``random_model``)."""
    from .presets import get_preset

    return random_model(get_preset(name).config(), dtype, device, device_map, seed)


def random_model(config, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                 device_map: str | dict | None = None, seed: int = 0) -> torch.nn.Module:
    """The model of ``config`` with random weights made directly where they will live, in eval mode.

    On ``device="meta"`` (and no ``device_map``) nothing is allocated: shapes and module tree only. Otherwise the
    module tree is built without parameter storage, each parameter is placed (``device``, or the device
    ``device_map`` gives it: ``"auto"``/``"balanced"``/``"sequential"`` through accelerate, or an explicit map)
    and drawn there: matrices and embeddings N(0, ``initializer_range``^2) (0.02 by default), other 1-D weights
    (norm scales) 1, biases 0. Each parameter's draw depends only on ``seed`` and its name, so a model sharded over
    several GPUs holds exactly the weights of the same model on one GPU (the draws of one device type agree;
    CPU and CUDA draws differ). A 7B model in bf16 needs about 16 GB in all, never more than its largest tensor
    in fp32 on top."""
    from vismech.models.families import family_for_config

    cls = family_for_config(config).model_class()
    if device_map is None and str(device) == "meta":
        with torch.device("meta"):
            return cls._from_config(config, dtype=dtype).eval()
    with _parameters_on_meta():
        model = cls._from_config(config, dtype=dtype)
    placement = _placement(model, dtype, device_map) if device_map is not None else None
    std = float(getattr(config, "initializer_range", None) or getattr(getattr(config, "text_config", None),
                                                                      "initializer_range", None) or 0.02)
    for pname, param in list(model.named_parameters()):
        dev = torch.device(_device_of(pname, placement) if placement is not None else device)
        owner, attr = _owner(model, pname)
        if attr == "bias":
            value = torch.zeros(param.shape, dtype=dtype, device=dev)
        elif param.ndim == 1:
            value = torch.ones(param.shape, dtype=dtype, device=dev)
        else:
            g = torch.Generator(device=dev).manual_seed(_name_seed(seed, pname))
            value = torch.randn(param.shape, generator=g, device=dev, dtype=torch.float32).mul_(std).to(dtype)
        owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    if placement is None:
        model.to(device)  # the buffers (rotary frequencies), built on the CPU
    else:
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map=placement, force_hooks=len(placement) > 1,
                               skip_keys=getattr(model, "_skip_keys_device_placement", None))
    model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"random weights left without storage: {', '.join(left[:3])}")
    return model.eval()


def _name_seed(seed: int, name: str) -> int:
    import zlib

    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


def _owner(model, pname: str):
    *path, attr = pname.split(".")
    mod = model
    for part in path:
        mod = getattr(mod, part)
    return mod, attr


def _device_of(pname: str, placement: dict) -> str | int:
    """The device a (sub)module map gives parameter ``pname``: its longest matching prefix."""
    parts = pname.split(".")
    for k in range(len(parts), -1, -1):
        key = ".".join(parts[:k])
        if key in placement:
            dev = placement[key]
            return f"cuda:{dev}" if isinstance(dev, int) else dev
    raise ValueError(f"the device map places no module that holds {pname}")


class _parameters_on_meta:
    """Within the block, new parameters are created on the meta device (no storage); buffers stay real."""

    def __enter__(self):
        self.old = torch.nn.Module.register_parameter

        def register(module, name, param):
            self.old(module, name, param)
            if param is not None:
                p = module._parameters[name]
                module._parameters[name] = torch.nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

        torch.nn.Module.register_parameter = register
        return self

    def __exit__(self, *exc):
        torch.nn.Module.register_parameter = self.old


def _placement(model, dtype: torch.dtype, device_map: str | dict) -> dict:
    """An explicit module -> device map: ``device_map`` itself, or accelerate's for ``auto``/``balanced``/
    ``sequential`` over this process's GPUs (``distributed.process_gpus``)."""
    if isinstance(device_map, dict):
        return device_map
    if device_map not in ("auto", "balanced", "sequential"):
        raise UserError(f"device_map must be auto, balanced, sequential or a dict, not {device_map!r}")
    try:
        from accelerate import infer_auto_device_map
        from accelerate.utils import get_balanced_memory
    except ImportError:
        raise UserError("--device-map needs accelerate: pip install 'vismech[multi-gpu]'") from None
    from vismech.distributed import max_memory

    budget = max_memory()
    if not budget:
        return {"": "cpu"}
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    if device_map != "sequential" and len(budget) > 1:
        budget = get_balanced_memory(model, max_memory=budget, no_split_module_classes=no_split, dtype=dtype)
    placement = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split, dtype=dtype)
    if any(d in ("cpu", "disk") for d in placement.values()):
        raise UserError(f"the model does not fit on this process's GPUs ({', '.join(map(str, budget))}); use more "
                        "GPUs per process (fewer torchrun processes) or a smaller dtype")
    return placement

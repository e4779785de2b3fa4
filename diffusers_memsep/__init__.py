"""diffusers-memsep: measure, explain and reduce memorization in diffusion models.

Implements *Provable Separations between Memorization and Generalization in Diffusion Models*
(Ye, Zhu, Tao, Chen; arXiv 2511.03202, ICLR 2026) on top of Hugging Face diffusers.

Public names are imported lazily (as diffusers does with its ``_LazyModule``): ``import diffusers_memsep`` stays
cheap, and a sub-package is only loaded when one of its names is used.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "PrunableDiTTransformer2DModel": "diffusers_memsep.models",
    "MemSepPipeline": "diffusers_memsep.pipelines",
    "MemSepPipelineOutput": "diffusers_memsep.pipelines",
    "PipelineLoadError": "diffusers_memsep.pipelines",
    # Pipeline components must be reachable as `diffusers_memsep.<ClassName>`: DiffusionPipeline.from_pretrained
    # imports a component's class from the top of the library named in model_index.json.
    "NearestNeighborIndex": "diffusers_memsep.memorization",
    "memorization": "diffusers_memsep.memorization",
    "pruning": "diffusers_memsep.pruning",
    "theory": "diffusers_memsep.theory",
    "experiments": "diffusers_memsep.experiments",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffusers_memsep' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if module.__name__.endswith("." + name) else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)

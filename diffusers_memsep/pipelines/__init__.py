from .pipeline_memsep import MemSepPipeline, MemSepPipelineOutput

__all__ = ["MemSepPipeline", "MemSepPipelineOutput"]

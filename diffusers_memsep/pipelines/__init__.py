from .pipeline_memsep import MemSepPipeline, MemSepPipelineOutput, PipelineLoadError

__all__ = ["MemSepPipeline", "MemSepPipelineOutput", "PipelineLoadError"]

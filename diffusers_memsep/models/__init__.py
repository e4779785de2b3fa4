from .prunable_dit import HeadMaskedAttnProcessor, PrunableDiTTransformer2DModel

__all__ = ["HeadMaskedAttnProcessor", "PrunableDiTTransformer2DModel"]

"""A DiT whose attention heads can be masked (soft, differentiable) or cut out of the weights (physical).

``PrunableDiTTransformer2DModel`` is ``diffusers.DiTTransformer2DModel`` plus one config key, ``pruned_heads``:
``{"layer": [head, ...]}`` in the ORIGINAL head numbering (JSON keys are strings). ``__init__`` re-applies it, so
a pruned model saved with ``save_pretrained`` is re-created with the pruned shapes by ``from_pretrained`` and its
safetensors weights load without a size mismatch.

Where a head is cut. In ``BasicTransformerBlock`` (``norm_type="ada_norm_zero"``) the self-attention ``attn1`` computes
``to_out(concat_h softmax(q_h k_h^T / sqrt(d)) v_h)``. Head ``h`` owns rows ``h*d:(h+1)*d`` of ``to_q``, ``to_k``,
``to_v`` and the same columns of ``to_out[0]``; removing them is exactly the same as multiplying that head's output by
0 before the out-projection (the soft mask), but costs no FLOPs. A layer whose heads are all pruned keeps its
zero-width projections: its attention branch then returns the out-projection's bias, which is again exactly what an
all-zero soft mask gives, so soft and physical pruning agree everywhere.

Design notes (why not the alternatives):
- The mask is applied by an attention *processor* (:class:`HeadMaskedAttnProcessor`), the diffusers extension point
  for attention, not by forward hooks: the gate has to sit between the per-head attention and the out-projection,
  where no module boundary exists.
- Masks are indexed in the ORIGINAL head numbering, shape ``(num_layers, num_attention_heads)``, whatever has been
  pruned already: importance scores, masks and ``pruned_heads`` all speak the same numbering, so pruning in rounds
  composes without renumbering. Entries of heads that are gone are ignored (they get zero gradient).
- The mask is gathered per forward call (not once in ``set_head_mask``), so one mask tensor can be back-propagated
  through many batches, as Algorithm 2 of the paper does when it accumulates ``|dL/d xi_h|``.
- Masks are state, not weights: they are never saved and never moved by ``.to()`` (they follow the activations'
  device at use).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from torch import nn

from ..utils import check_config_types, read_json_object

# ``ModelMixin`` must be importable from this module: ``DiffusionPipeline.from_pretrained`` records a component of a
# non-diffusers library as (module path, class) in ``model_index.json`` and looks the loading base class up by name
# in that module (``pipeline_loading_utils.get_class_obj_and_candidates``).

PrunedHeads = dict[int, list[int]]

#: safetensors metadata key under which :meth:`PrunableDiTTransformer2DModel.save_pretrained` records the head layout
#: of the weights: ``num_attention_heads`` x ``attention_head_dim`` cannot be read from the weight shapes (1 head of
#: 16 and 2 heads of 8 have the same matrices) but change what the model computes.
HEAD_LAYOUT_KEY = "memsep_head_layout"
_LAYOUT_KEYS = ("num_attention_heads", "attention_head_dim")


class HeadMaskedAttnProcessor:
    """Self-attention (as ``AttnProcessor2_0`` for DiT) with an optional gate on each head's output.

    ``kept_heads`` are the original indices of the heads still in the weights, in their order there; ``head_mask``
    is the model's full ``(num_layers, num_attention_heads)`` mask or None, of which row ``layer_index`` is used.
    """

    def __init__(self, layer_index: int, kept_heads: list[int]):
        self.layer_index = layer_index
        self.kept_heads = kept_heads
        self.head_mask: torch.Tensor | None = None

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, *args, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("HeadMaskedAttnProcessor implements DiT's self-attention only (no context, no mask).")
        if attn.heads == 0:  # every head pruned: the branch is the out-projection's bias (see module docstring)
            return _zero_width_attention_output(attn, hidden_states)

        batch, tokens, _ = hidden_states.shape
        head_dim = attn.to_q.out_features // attn.heads
        split_heads = lambda x: x.view(batch, tokens, attn.heads, head_dim).transpose(1, 2)  # noqa: E731
        query, key, value = (split_heads(proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        per_head = F.scaled_dot_product_attention(query, key, value)  # (batch, heads, tokens, head_dim)
        if self.head_mask is not None:
            gate = self.head_mask[self.layer_index, self.kept_heads].to(per_head.dtype)
            per_head = per_head * gate.view(1, -1, 1, 1)
        hidden_states = per_head.transpose(1, 2).reshape(batch, tokens, attn.heads * head_dim)
        return attn.to_out[1](attn.to_out[0](hidden_states)) / attn.rescale_output_factor


def _zero_width_attention_output(attn: Attention, hidden_states: torch.Tensor) -> torch.Tensor:
    out_proj = attn.to_out[0]
    if out_proj.bias is None:
        return torch.zeros_like(hidden_states)
    return out_proj.bias.to(hidden_states.dtype).expand_as(hidden_states) / attn.rescale_output_factor


def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep only ``index`` along ``dim`` of ``linear.weight`` (0: output rows, 1: input columns), in place."""
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device)).clone()
    linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if dim == 0:
        if linear.bias is not None:
            bias = linear.bias.detach().index_select(0, index.to(linear.bias.device)).clone()
            linear.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
        linear.out_features = weight.shape[0]
    else:
        linear.in_features = weight.shape[1]


class PrunableDiTTransformer2DModel(DiTTransformer2DModel):
    r"""
    [`diffusers.DiTTransformer2DModel`] with attention heads that can be masked or physically pruned.

    Parameters:
        All of [`diffusers.DiTTransformer2DModel`], plus
        pruned_heads (`dict[str, list[int]]`, *optional*):
            Heads removed from the weights, ``{layer: [head, ...]}`` in the original head numbering. Set by
            [`~PrunableDiTTransformer2DModel.prune_heads`]; re-applied at construction so that
            ``from_pretrained`` re-creates the pruned shapes.
    """

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 28,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        attention_bias: bool = True,
        sample_size: int = 32,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_zero",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-5,
        pruned_heads: Mapping[str, Iterable[int]] | None = None,
    ):
        # Check before building anything, so a bad config fails fast and names the key.
        layout = _validate_new_heads(pruned_heads or {}, num_layers, num_attention_heads, {}, "config `pruned_heads`")
        super().__init__(
            num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim, in_channels=in_channels,
            out_channels=out_channels, num_layers=num_layers, dropout=dropout, norm_num_groups=norm_num_groups,
            attention_bias=attention_bias, sample_size=sample_size, patch_size=patch_size,
            activation_fn=activation_fn, num_embeds_ada_norm=num_embeds_ada_norm, upcast_attention=upcast_attention,
            norm_type=norm_type, norm_elementwise_affine=norm_elementwise_affine, norm_eps=norm_eps,
        )
        self._head_mask: torch.Tensor | None = None
        for layer_index, block in enumerate(self.transformer_blocks):
            block.attn1.set_processor(HeadMaskedAttnProcessor(layer_index, list(range(num_attention_heads))))
        self._cut_heads(layout)
        self._register_layout(layout)

    def _register_layout(self, layout) -> None:
        """Record the pruned layout in the config. diffusers lists init arguments left at their default in
        ``_use_default_values`` and drops them in ``from_config``; ``pruned_heads`` is set after init, so it is taken
        off that list, or ``from_config(model.config)`` would rebuild the unpruned shapes."""
        self.register_to_config(pruned_heads=_to_config(layout))
        defaults = self._internal_dict.get("_use_default_values")
        if defaults and "pruned_heads" in defaults:
            self.register_to_config(_use_default_values=[k for k in defaults if k != "pruned_heads"])

    # ----------------------------------------------------------------------------------------------- conversion
    @classmethod
    def from_dit(cls, dit: DiTTransformer2DModel) -> "PrunableDiTTransformer2DModel":
        """A prunable copy of a stock ``DiTTransformer2DModel``: same config, weights, dtype and device."""
        if not isinstance(dit, DiTTransformer2DModel):
            raise TypeError(f"from_dit expects a diffusers DiTTransformer2DModel, got {type(dit).__name__}.")
        if isinstance(dit, cls):
            raise TypeError("This model is already a PrunableDiTTransformer2DModel; use it as it is (or deepcopy).")
        config = {k: v for k, v in dit.config.items() if not k.startswith("_")}
        model = cls(**config)
        model.load_state_dict(dit.state_dict())
        parameter = next(dit.parameters())
        return model.to(device=parameter.device, dtype=parameter.dtype).train(dit.training)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """:meth:`diffusers.ModelMixin.from_pretrained`, safetensors only by default (``use_safetensors=True``), and
        strict: weights missing for the config (e.g. a hand-edited ``num_layers`` or ``pruned_heads``), left over,
        or of another shape raise a ValueError naming the weights file, where diffusers would only warn and keep
        randomly initialised weights."""
        kwargs.setdefault("use_safetensors", True)
        want_info = kwargs.pop("output_loading_info", False)
        folder = os.path.join(os.fspath(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        config_file = os.path.join(folder, "config.json")
        if os.path.isfile(config_file):  # local: check the config before diffusers builds anything from it
            config = read_json_object(config_file, "config")
            defaults = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
                        if p.default is not inspect.Parameter.empty}
            check_config_types(config, defaults, config_file)
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        except (ValueError, RuntimeError) as error:
            if "ignore_mismatched_sizes" not in str(error):
                raise
            # diffusers suggests ignore_mismatched_sizes=True, which would replace the weights with random ones
            first = str(error).split(". If you want")[0]
            raise ValueError(f"the weights in {folder!r} do not match the config.json beside them ({first}); "
                             "restore the config.json saved with these weights (num_layers, num_attention_heads, "
                             "attention_head_dim, pruned_heads...) or save the model again.") from None
        _check_head_layout(model, folder, config_file)
        kinds = (("missing", "missing_keys"), ("unexpected", "unexpected_keys"),
                 ("of another shape", "mismatched_keys"))
        problems = {what: info.get(key) for what, key in kinds if info.get(key)}
        if problems:
            folder = os.path.join(os.fspath(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
            local = os.path.isdir(folder)
            files = [name for name in sorted(os.listdir(folder)) if name.endswith(".safetensors")] if local else []
            where = os.path.join(folder, files[0]) if len(files) == 1 else folder
            listed = "; ".join(f"{len(keys)} {what} (e.g. {_key_name(keys[0])})" for what, keys in problems.items())
            raise ValueError(
                f"the weights {where!r} do not match the config.json beside them: {listed}; restore the config.json "
                "saved with these weights (num_layers, num_attention_heads, pruned_heads...) or save the model again."
            )
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """:meth:`diffusers.ModelMixin.save_pretrained`, with the head layout recorded in the safetensors metadata
        (:data:`HEAD_LAYOUT_KEY`), so :meth:`from_pretrained` refuses a config.json edited to another layout."""
        layout = json.dumps({key: int(self.config[key]) for key in _LAYOUT_KEYS})
        with _safetensors_metadata({HEAD_LAYOUT_KEY: layout}):
            return super().save_pretrained(save_directory, *args, **kwargs)

    # ------------------------------------------------------------------------------------------------ inspection
    def kept_heads(self) -> list[list[int]]:
        """Original indices of the heads still in the weights, layer by layer."""
        return [list(block.attn1.processor.kept_heads) for block in self.transformer_blocks]

    def heads_per_layer(self) -> list[int]:
        """Number of heads still in the weights of each layer."""
        return [len(heads) for heads in self.kept_heads()]

    @property
    def head_mask(self) -> torch.Tensor | None:
        return self._head_mask

    # ------------------------------------------------------------------------------------------------- soft mask
    def set_head_mask(self, mask: torch.Tensor | None) -> None:
        """Gate each head's attention output by ``mask[layer, head]`` (original numbering), or clear with None.

        The mask is used as given (no copy), so gradients reach it: with ``mask.requires_grad_()``, a backward pass
        fills ``mask.grad`` with ``dL/d xi_h``, the quantity of the paper's Algorithm 2. Entries of pruned heads are
        ignored. Masks are not saved with the model.
        """
        if mask is not None:
            expected = (self.config.num_layers, self.config.num_attention_heads)
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"head mask must be a torch.Tensor of shape {expected}, got {type(mask).__name__}.")
            if tuple(mask.shape) != expected:
                raise ValueError(
                    f"head mask has shape {tuple(mask.shape)}, expected (num_layers, num_attention_heads) = {expected}"
                    " in the original head numbering (entries of pruned heads are ignored)."
                )
            if not mask.is_floating_point():
                raise TypeError(f"head mask must be a floating-point tensor, got {mask.dtype}; use mask.float().")
            if not bool(torch.isfinite(mask.detach()).all()):
                raise ValueError("head mask holds NaN or infinite values; use finite gates (1 keeps, 0 drops a head).")
        self._head_mask = mask
        for block in self.transformer_blocks:
            block.attn1.processor.head_mask = mask

    # ------------------------------------------------------------------------------------------ physical pruning
    def prune_heads(self, heads_to_prune: Mapping[int | str, Iterable[int]]) -> None:
        """Remove heads ``{layer: [head, ...]}`` (original numbering) from the weights, and record them in the config.

        Validates everything first: on any bad index the model is left unchanged. Create optimizers after pruning
        (the projections get new, smaller parameters).
        """
        current = {layer: heads for layer, heads in self._pruned_layout().items() if heads}
        new = _validate_new_heads(
            heads_to_prune, self.config.num_layers, self.config.num_attention_heads, current, "heads_to_prune"
        )
        self._cut_heads(new)
        merged = {layer: sorted(set(current.get(layer, [])) | set(new.get(layer, []))) for layer in
                  set(current) | set(new)}
        self._register_layout(merged)

    def _pruned_layout(self) -> PrunedHeads:
        all_heads = set(range(self.config.num_attention_heads))
        return {i: sorted(all_heads - set(kept)) for i, kept in enumerate(self.kept_heads())}

    def _cut_heads(self, heads_to_prune: PrunedHeads) -> None:
        for layer_index, heads in heads_to_prune.items():
            if not heads:
                continue
            attn = self.transformer_blocks[layer_index].attn1
            processor: HeadMaskedAttnProcessor = attn.processor
            head_dim = self.config.attention_head_dim
            removed = set(heads)
            keep_positions = [p for p, h in enumerate(processor.kept_heads) if h not in removed]
            index = torch.tensor(
                [p * head_dim + j for p in keep_positions for j in range(head_dim)], dtype=torch.long
            )
            for projection in (attn.to_q, attn.to_k, attn.to_v):
                _slice_linear(projection, index, dim=0)
            _slice_linear(attn.to_out[0], index, dim=1)
            # Attention's head bookkeeping, read by processors, slicing and `fuse_projections`.
            attn.heads = attn.sliceable_head_dim = len(keep_positions)
            attn.inner_dim = attn.inner_kv_dim = len(keep_positions) * head_dim
            processor.kept_heads = [processor.kept_heads[p] for p in keep_positions]


def _validate_new_heads(
    heads: Mapping, num_layers: int, num_heads: int, already_pruned: Mapping[int, list[int]], what: str
) -> PrunedHeads:
    """Parse ``{layer: [heads]}`` (int or numeric-string keys) into ints, or raise naming the first problem."""
    if not isinstance(heads, Mapping):
        raise TypeError(f"{what} must be a mapping {{layer: [head, ...]}}, got {type(heads).__name__}.")
    parsed: PrunedHeads = {}
    for key, values in heads.items():
        if isinstance(key, str) and key.lstrip("-").isdigit():
            layer = int(key)
        elif isinstance(key, int) and not isinstance(key, bool):
            layer = key
        else:
            raise TypeError(f"{what}: layer index {key!r} is not an integer.")
        if not 0 <= layer < num_layers:
            raise ValueError(f"{what}: layer {layer} is out of range; the model has layers 0..{num_layers - 1}.")
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise TypeError(f"{what}: heads of layer {layer} must be a list of integers, got {values!r}.")
        values = list(values)
        for head in values:
            if isinstance(head, bool) or not isinstance(head, int):
                raise TypeError(f"{what}: head index {head!r} in layer {layer} is not an integer.")
            if not 0 <= head < num_heads:
                raise ValueError(f"{what}: head {head} in layer {layer} is out of range 0..{num_heads - 1}.")
            if head in already_pruned.get(layer, ()):
                raise ValueError(f"{what}: head {head} in layer {layer} is already pruned; pick a remaining head.")
        if len(set(values)) != len(values):
            raise ValueError(f"{what}: layer {layer} lists a head twice: {values}.")
        if values:
            parsed.setdefault(layer, [])
            if set(parsed[layer]) & set(values):
                raise ValueError(f"{what}: layer {layer} is given twice with the same heads.")
            parsed[layer] = sorted(parsed[layer] + values)
    return parsed


@contextlib.contextmanager
def _safetensors_metadata(extra: dict[str, str]):
    """Add ``extra`` to the metadata of every ``safetensors.torch.save_file`` call inside the block (diffusers'
    ``save_pretrained`` has no metadata argument)."""
    import safetensors.torch

    original = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        return original(tensors, filename, metadata={**(metadata or {}), **extra})

    safetensors.torch.save_file = save_file
    try:
        yield
    finally:
        safetensors.torch.save_file = original


def _check_head_layout(model, folder: str, config_file: str) -> None:
    """Refuse a config.json whose head layout differs from the one recorded with the weights (local folders whose
    weights carry :data:`HEAD_LAYOUT_KEY`; weights saved elsewhere, e.g. a stock DiT, record none)."""
    if not os.path.isdir(folder):
        return
    from safetensors import safe_open

    for name in sorted(os.listdir(folder)):
        if not name.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(folder, name), framework="pt") as handle:
            recorded = (handle.metadata() or {}).get(HEAD_LAYOUT_KEY)
        if recorded is None:
            continue
        try:
            recorded = json.loads(recorded)
        except ValueError:
            continue
        configured = {key: model.config.get(key) for key in _LAYOUT_KEYS}
        if any(recorded.get(key) != configured[key] for key in _LAYOUT_KEYS):
            raise ValueError(
                f"{config_file!r} says {configured['num_attention_heads']} heads x {configured['attention_head_dim']} "
                f"but the weights {os.path.join(folder, name)!r} were saved with {recorded.get('num_attention_heads')}"
                f" heads x {recorded.get('attention_head_dim')}: the same matrices, another model. Restore "
                f"num_attention_heads={recorded.get('num_attention_heads')} and attention_head_dim="
                f"{recorded.get('attention_head_dim')} in that config.json."
            )
        return


def _key_name(key) -> str:
    """A state-dict key, or the first item of a (key, shape, shape) entry of ``mismatched_keys``."""
    return str(key[0] if isinstance(key, (tuple, list)) else key)


def _to_config(layout: PrunedHeads) -> dict[str, list[int]]:
    """JSON-friendly form: string keys, sorted, no empty layers."""
    return {str(layer): sorted(heads) for layer, heads in sorted(layout.items()) if heads}

"""TSN's "good practices" for training with little video data (Wang et al., ECCV 2016, sec. 3.2).

Each practice is a separate function so it can be switched on and off from the config:

* Cross-modality pre-training -- ``cross_modality_init_``, ``init_from_rgb_checkpoint`` and
  the weight loaders built on ``load_state_dict_cross_modality``: a flow / RGB-difference net
  starts from RGB weights; its first conv gets the RGB kernels averaged over the 3 input
  channels and replicated over its own input channels; every other layer is copied.
* Partial BN -- ``freeze_bn_except_first_``: every BatchNorm except the first one keeps its
  ImageNet statistics and affine parameters; the first re-estimates its statistics because its
  input distribution changed with the modality.  ``TSN(partial_bn=True)`` applies it and keeps
  it applied across ``model.train()``.
* Per-group learning rates -- ``param_groups``: the optimisation policy of the authors'
  PyTorch code (``get_optim_policies`` in tsn-pytorch), including the x5 / x10 first-conv
  multipliers of flow nets.

(Extra dropout is the ``dropout`` argument of ``tsn.model.TSN``; gradient clipping lives in the
training code.)

Apart from ``tsn.consensus`` this module imports nothing from ``tsn``, so the backbone and model
modules can use it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from dataloading import modality as modalities
from tsn.consensus import WeightedConsensus

# --------------------------------------------------------------------------------------------
# Cross-modality pre-training
# --------------------------------------------------------------------------------------------


def find_first_conv(module: nn.Module) -> tuple[str, nn.Conv2d]:
    """Return ``(qualified_name, conv)`` of the first conv layer of ``module``.

    timm models name their stem conv in ``pretrained_cfg['first_conv']`` (e.g. 'conv1',
    'conv_stem', 'stem.0'): that is used when present, because registration order need not be
    execution order.  Otherwise it is the first ``nn.Conv2d`` in ``module.modules()`` order, the
    rule of the authors' code (true for the tiny CNN and BN-Inception here).  ``module`` may
    itself be a conv (name '').
    """
    for name, m in module.named_modules():
        cfg = getattr(m, "pretrained_cfg", None)
        stem = cfg.get("first_conv") if isinstance(cfg, Mapping) else None
        if isinstance(stem, str):
            try:
                conv = m.get_submodule(stem)
            except AttributeError:  # stale config: fall back to module order
                conv = None
            if isinstance(conv, nn.Conv2d):
                return (f"{name}.{stem}" if name else stem), conv
        if isinstance(m, nn.Conv2d):
            return name, m
    raise ValueError(f"no nn.Conv2d found in {type(module).__name__}")


def cross_modality_weight(rgb_weight: torch.Tensor, new_in_channels: int) -> torch.Tensor:
    """Average an RGB conv kernel over its input channels and replicate it.

    ``(O, 3, kh, kw) -> (O, new_in_channels, kh, kw)``; every input channel gets the same
    kernel, the mean of the three RGB kernels (the paper's cross-modality initialisation; no
    rescaling, as in the authors' code).
    """
    if rgb_weight.dim() != 4 or rgb_weight.shape[1] != 3:
        raise ValueError(
            f"cross-modality init needs an RGB conv weight of shape (O, 3, kh, kw), "
            f"got {tuple(rgb_weight.shape)}"
        )
    if new_in_channels < 1:
        raise ValueError(f"new_in_channels must be >= 1, got {new_in_channels}")
    mean = rgb_weight.mean(dim=1, keepdim=True)
    return mean.expand(-1, new_in_channels, -1, -1).contiguous()


def cross_modality_init_(module: nn.Module, new_in_channels: int) -> nn.Conv2d:
    """Turn the 3-channel first conv of ``module`` into a ``new_in_channels`` one, in place.

    ``module`` is a ``nn.Conv2d`` or a model (its first conv is found by ``find_first_conv``).
    The conv keeps its class, stride, padding and bias (copied unchanged); its weight becomes
    ``cross_modality_weight(old_weight, new_in_channels)``.  The conv object is modified rather
    than swapped so that its parent module, hooks and name stay valid.  Returns the conv.
    Call it before building the optimizer: the weight is a new Parameter.
    """
    conv = module if isinstance(module, nn.Conv2d) else find_first_conv(module)[1]
    if conv.groups != 1:
        raise ValueError(f"cross-modality init needs an ungrouped conv, got groups={conv.groups}")
    with torch.no_grad():
        new_weight = cross_modality_weight(conv.weight, new_in_channels)
    conv.weight = nn.Parameter(new_weight, requires_grad=conv.weight.requires_grad)
    conv.in_channels = new_in_channels
    return conv


def _unwrap_state_dict(state: Mapping) -> dict[str, torch.Tensor]:
    """Accept a bare state dict, a ``{'state_dict': ...}`` / ``{'model': ...}`` checkpoint, and
    strip the ``module.`` prefix that DataParallel / DDP add."""
    for key in ("state_dict", "model"):
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``torch.save``'d state dict from a local file (``weights_only=True``, CPU)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a state dict")
    return _unwrap_state_dict(state)


def squeeze_caffe_vectors(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]
                          ) -> dict[str, torch.Tensor]:
    """``state`` with every (1, C) tensor whose key ``own`` holds as (C,) reshaped to (C,).

    The authors' BN-Inception weights (converted from Caffe, where a BN's scale, shift, mean and
    variance are (1, C) blobs) store BN tensors so; only that unambiguous case is reshaped,
    everything else is returned as it is (and a real mismatch is still reported).
    """
    def fit(key: str, v: torch.Tensor) -> torch.Tensor:
        target = own.get(key)
        if (target is not None and v.dim() == 2 and v.shape[0] == 1 and target.dim() == 1
                and v.shape[1] == target.shape[0]):
            return v.reshape(target.shape)
        return v

    return {k: fit(k, v) for k, v in state.items()}


def _list(title: str, keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    more = f", ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"\n  {title} ({len(keys)}): {shown}{more}"


def load_state_dict_cross_modality(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    optional_prefixes: tuple[str, ...] = (),
) -> list[str]:
    """Copy ``state_dict`` into ``module`` with cross-modality adaptation of the first conv.

    * The first conv's weight (``find_first_conv``): if the source has 3 input channels and the
      module another number, it is mean-replicated (``cross_modality_weight``).
    * A (1, C) tensor where the module holds a (C,) one is flattened: the authors' Caffe ->
      PyTorch BN-Inception file stores its BN blobs so (`squeeze_caffe_vectors`).
    * Keys starting with one of ``optional_prefixes`` (e.g. a classifier) may be missing,
      unexpected or of another shape: they are then skipped and the module keeps its value.
      ``num_batches_tracked`` buffers may be missing too (files from before PyTorch 0.4).
    * Every other key must exist on both sides with the same shape; otherwise ValueError
      listing all missing / unexpected / mis-shaped keys, and nothing is loaded.

    Returns the module's keys left at their current value.
    """
    own = module.state_dict()
    state = squeeze_caffe_vectors(_unwrap_state_dict(state_dict), own)
    first_name, _ = find_first_conv(module)
    first_key = f"{first_name}.weight" if first_name else "weight"

    def optional(key: str) -> bool:
        return key.startswith(optional_prefixes) or key.endswith("num_batches_tracked")

    to_load, left, missing, mismatched = {}, [], [], []
    for key, target in own.items():
        if key not in state:
            (left if optional(key) else missing).append(key)
            continue
        src = state[key]
        if (key == first_key and src.dim() == 4 and src.shape != target.shape
                and src.shape[1] == 3 and src.shape[0] == target.shape[0]
                and src.shape[2:] == target.shape[2:]):
            src = cross_modality_weight(src, target.shape[1])
        if src.shape != target.shape:
            if optional(key):
                left.append(key)
            else:
                mismatched.append(f"{key} {tuple(src.shape)}->{tuple(target.shape)}")
            continue
        to_load[key] = src
    unexpected = [k for k in state if k not in own and not optional(k)]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"state dict does not fit {type(module).__name__} (nothing was loaded):"
            + (_list("missing", missing) if missing else "")
            + (_list("unexpected", unexpected) if unexpected else "")
            + (_list("shape mismatch (file->model)", mismatched) if mismatched else "")
        )
    module.load_state_dict(to_load, strict=False)  # completeness was checked above
    return left


def init_from_rgb_checkpoint(
    model: nn.Module, rgb_state_dict: Mapping[str, torch.Tensor]
) -> list[str]:
    """Seed a flow / RGB-diff TSN from the state dict of an RGB TSN with the same backbone.

    The first conv is cross-modality initialised from the RGB one, every other backbone layer is
    copied exactly; the classifier (``fc.*``) and consensus weights (``consensus.*``) are copied
    when their shapes match (same class count / segment count) and left at init otherwise.
    Anything else that does not fit raises ValueError.  Returns the keys left at init.
    """
    return load_state_dict_cross_modality(
        model, rgb_state_dict, optional_prefixes=("fc.", "consensus.")
    )


# --------------------------------------------------------------------------------------------
# Partial BN
# --------------------------------------------------------------------------------------------


def batchnorm_layers(module: nn.Module) -> list[_BatchNorm]:
    """All BatchNorm layers (1d/2d/3d/Sync, timm's BatchNormAct2d) in ``modules()`` order."""
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


def freeze_bn_except_first_(module: nn.Module) -> list[_BatchNorm]:
    """Partial BN: freeze every BatchNorm of ``module`` except the first one.

    Frozen layers are put in eval mode (normalise with, and stop updating, their running
    statistics) and their affine weight/bias get ``requires_grad=False``.  The first BN in
    ``modules()`` order is untouched so it re-estimates its statistics for the new modality.
    ``model.train()`` puts every layer back in training mode, so this has to be re-applied after
    it: ``TSN.train`` does that.  Returns the frozen layers.
    """
    frozen = batchnorm_layers(module)[1:]
    for bn in frozen:
        bn.eval()
        for p in bn.parameters(recurse=False):
            p.requires_grad_(False)
    return frozen


# --------------------------------------------------------------------------------------------
# Optimiser parameter groups
# --------------------------------------------------------------------------------------------

_NORM_TYPES = (_NormBase, nn.GroupNorm, nn.LayerNorm)
_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def default_first_conv_lr_mult(modality: str) -> tuple[float, float]:
    """(weight, bias) lr multipliers of the first conv: the modality table's
    ``first_conv_lr_mult`` (`dataloading.modality`).

    Motion modalities (flow, warped_flow, rgb_diff): (5, 10), the authors' flow setting: the
    first conv sees a new kind of input and has to move further from its RGB initialisation.
    The authors' PyTorch code applies it to flow only (its RGBDiff nets got (1, 2)); this
    project applies it to every motion modality (override with ``first_conv_lr_mult``).
    RGB: (1, 2), i.e. the same as every other conv (biases at x2), as in the authors' code.
    """
    return modalities.get(modality).first_conv_lr_mult


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    first_conv_lr_mult: tuple[float, float] | None = None,
) -> list[dict]:
    """Parameter groups for ``torch.optim.SGD``, following the authors' ``get_optim_policies``.

    Each group is ``{'params', 'lr', 'weight_decay', 'name', 'lr_mult', 'decay_mult'}`` with
    ``lr = lr * lr_mult`` and ``weight_decay = weight_decay * decay_mult``; a scheduler sets
    ``group['lr'] = base_lr * group['lr_mult']``.  Factors (``first_conv_lr_mult=None`` picks
    ``default_first_conv_lr_mult(model.modality)``):

    =================  ======================  ==========
    name               lr_mult                 decay_mult
    =================  ======================  ==========
    first_conv_weight  5 (motion) / 1 (rgb)    1
    first_conv_bias    10 (motion) / 2 (rgb)   0
    normal_weight      1                       1
    normal_bias        2                       0
    bn                 1                       0
    consensus          1                       0
    =================  ======================  ==========

    Parameters with ``requires_grad=False`` (BNs frozen by Partial BN) are in no group, every
    trainable parameter is in exactly one.  Empty groups (e.g. a bias-free first conv) are
    left out.  Layers other than conv / linear / norm / weighted consensus raise ValueError,
    as in the authors' code, rather than silently getting a policy.
    """
    if first_conv_lr_mult is None:
        modality = getattr(model, "modality", None)
        if modality is None:
            # e.g. a DDP wrapper: guessing 'rgb' would silently drop the flow multipliers.
            raise ValueError(
                f"{type(model).__name__} has no .modality: pass first_conv_lr_mult, or the "
                f"unwrapped TSN (ddp_model.module)"
            )
        first_conv_lr_mult = default_first_conv_lr_mult(modality)
    # name: (lr_mult, decay_mult).  Biases: x2 and no decay, the Caffe convention the
    # authors kept; norm scale/shift: no decay.  The weighted-consensus logits are not in the
    # authors' code: no decay, since it would only pull the segment weights towards uniform.
    policy = {
        "first_conv_weight": (float(first_conv_lr_mult[0]), 1.0),
        "first_conv_bias": (float(first_conv_lr_mult[1]), 0.0),
        "normal_weight": (1.0, 1.0),
        "normal_bias": (2.0, 0.0),
        "bn": (1.0, 0.0),
        "consensus": (1.0, 0.0),
    }
    _, first = find_first_conv(model)
    groups: dict[str, list[nn.Parameter]] = {name: [] for name in policy}
    seen: set[int] = set()

    def add(name: str, p: nn.Parameter | None) -> None:
        # Skip frozen parameters and ones shared with a layer already visited.
        if p is None or not p.requires_grad or id(p) in seen:
            return
        seen.add(id(p))
        groups[name].append(p)

    for mod_name, m in model.named_modules():
        own = list(m.parameters(recurse=False))
        if not own:
            continue
        if m is first:
            add("first_conv_weight", m.weight)
            add("first_conv_bias", m.bias)
        elif isinstance(m, _WEIGHT_LAYERS):
            add("normal_weight", m.weight)
            add("normal_bias", m.bias)
        elif isinstance(m, _NORM_TYPES):
            for p in own:
                add("bn", p)
        elif isinstance(m, WeightedConsensus):
            for p in own:
                add("consensus", p)
        else:
            raise ValueError(
                f"no learning-rate policy for {mod_name or 'model'} ({type(m).__name__}) which "
                f"holds parameters; supported: conv, linear, norm layers, weighted consensus"
            )

    return [
        {
            "params": params,
            "lr": lr * policy[name][0],
            "weight_decay": weight_decay * policy[name][1],
            "name": name,
            "lr_mult": policy[name][0],
            "decay_mult": policy[name][1],
        }
        for name, params in groups.items()
        if params
    ]

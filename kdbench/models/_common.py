"""Shared plumbing for the kdbench model zoo.

Every model in :mod:`kdbench.models` derives from :class:`StagedNet`, which
gives it timm's model interface (``forward_features``, ``forward_head``,
``forward_intermediates``, ``get_classifier``, ``reset_classifier``,
``feature_info``, ``num_classes``, ``num_features``) on top of one small
hook: ``_stage_fns()`` returns one callable per entry of ``feature_info``;
calling them in order is the network's trunk, and the output of callable
``i`` is feature ``i``.  ``forward_features``/``forward`` run exactly the
same callables, so the maps returned by ``forward_intermediates`` are the
very tensors the ordinary forward computes.

:func:`timm_entry_model` is what the ``@register_model`` entry functions call: it
absorbs the extra keyword arguments :func:`timm.create_model` passes to entry
functions (``pretrained``, ``pretrained_cfg``, ``pretrained_cfg_overlay``,
``cache_dir``; plus ``device``/``dtype`` and ``features_only``).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn

from timm.models._features import feature_take_indices

from kdbench.data.spec import fixed_info

__all__ = ['StagedNet', 'timm_entry_model', 'CIFAR100_MEAN', 'CIFAR100_STD', 'MNIST_MEAN', 'MNIST_STD']

# The models' timm metadata (pretrained_cfg mean/std) says what their inputs are normalised with: the values
# training uses, read from the one table of dataset facts.
CIFAR100_MEAN, CIFAR100_STD = fixed_info("cifar100").mean, fixed_info("cifar100").std
MNIST_MEAN, MNIST_STD = fixed_info("mnist").mean, fixed_info("mnist").std


class StagedNet(nn.Module):
    """Base class: a trunk made of feature stages, a global-pool + linear head.

    Subclasses must set ``num_classes``, ``num_features`` (width of the
    ``forward_features`` output), ``feature_info`` and ``head_name`` (the
    attribute holding the classifier) and implement ``_stage_fns``.  They may
    override ``_final`` (ops after the last feature stage that belong to
    ``forward_features``, e.g. a final BN-ReLU) and ``_init_classifier``.
    """

    head_name: str = 'fc'
    num_classes: int
    num_features: int
    feature_info: List[Dict[str, Any]]

    # --- hooks -------------------------------------------------------------
    def _stage_fns(self) -> List[Callable[[torch.Tensor], torch.Tensor]]:
        raise NotImplementedError

    def _final(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _init_classifier(self, layer: nn.Linear) -> None:
        """Initialise a freshly built classifier (default: PyTorch's Linear init)."""

    def _make_classifier(self, num_classes: int, ref: Optional[torch.Tensor] = None) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        kw = {} if ref is None else dict(device=ref.device, dtype=ref.dtype)
        layer = nn.Linear(self.num_features, num_classes, **kw)
        self._init_classifier(layer)
        return layer

    # --- timm interface ----------------------------------------------------
    def get_classifier(self) -> nn.Module:
        return getattr(self, self.head_name)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool not in (None, 'avg'):
            raise ValueError(f'{type(self).__name__} only supports global_pool="avg", got {global_pool!r}')
        ref = next(self.parameters(), None)
        self.num_classes = num_classes
        setattr(self, self.head_name, self._make_classifier(num_classes, ref))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self._stage_fns():
            x = fn(x)
        return self._final(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if x.ndim == 4:
            x = x.mean(dim=(2, 3))  # global average pool (== AvgPool2d(final map size) + flatten)
        x = self.head_drop(x)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward that also returns the stage outputs listed in ``feature_info``.

        Args:
            x: input batch.
            indices: take the last n stages if int, all if None, the given stage
                indices (negative counts from the end) if a sequence.
            norm: accepted for timm compatibility; no model here has a norm to
                apply to intermediates, so it is ignored.
            stop_early: stop after the last requested stage (the returned final
                features are then that stage's output).
            output_fmt: only 'NCHW' (MLP features are (B, C)).
            intermediates_only: return only the list of intermediates.

        Returns:
            ``(final_features, intermediates)``, or ``intermediates`` if
            ``intermediates_only``; ``final_features`` is what
            ``forward_features`` returns (when not stopping early).
        """
        assert output_fmt == 'NCHW', 'Output format must be NCHW.'
        stages = self._stage_fns()
        intermediates: List[torch.Tensor] = []
        if not stages:
            return intermediates if intermediates_only else (self._final(x), intermediates)
        take_indices, max_index = feature_take_indices(len(stages), indices)
        if stop_early or intermediates_only:
            stages = stages[:max_index + 1]
        for i, fn in enumerate(stages):
            x = fn(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        if len(stages) == len(self.feature_info):
            x = self._final(x)
        return x, intermediates


def _as_feature_info(info: Sequence[Tuple[int, int, str]]) -> List[Dict[str, Any]]:
    return [dict(num_chs=c, reduction=r, module=m) for c, r, m in info]


def timm_entry_model(
        cls: Type[nn.Module],
        variant: str,
        pretrained: bool = False,
        *,
        data_cfg: Dict[str, Any],
        **kwargs: Any,
) -> nn.Module:
    """Build ``cls(**kwargs)`` for a registered entry function named ``variant``.

    ``data_cfg`` is the minimal pretrained_cfg attached to the model (input size,
    normalisation, ...; there are never weights).  Extra keyword arguments
    from :func:`timm.create_model` are absorbed here; anything else goes to
    the model constructor (which raises ``TypeError`` on unknown names).
    """
    if pretrained:
        raise ValueError(f'no pretrained weights for {variant}')
    kwargs.pop('pretrained_cfg', None)
    kwargs.pop('pretrained_cfg_overlay', None)
    kwargs.pop('cache_dir', None)
    device = kwargs.pop('device', None)
    dtype = kwargs.pop('dtype', None)
    features_only = kwargs.pop('features_only', False)
    out_indices = kwargs.pop('out_indices', None)
    feature_cfg = kwargs.pop('feature_cfg', None) or {}

    model = cls(**kwargs)
    pretrained_cfg = dict(
        architecture=variant,
        tag=None,
        num_classes=model.num_classes,
        classifier=model.head_name,
        has_weights=False,
        **data_cfg,
    )
    model.pretrained_cfg = pretrained_cfg
    model.default_cfg = pretrained_cfg
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    if features_only:
        from timm.models._features import FeatureGetterNet
        n = len(model.feature_info)
        if out_indices is None:
            out_indices = tuple(range(n))
        model = FeatureGetterNet(model, out_indices=out_indices, prune=False, **feature_cfg)
    return model

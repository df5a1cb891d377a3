"""The texture-bias picture: a PCA colouring of a model's last-layer patch features."""

from __future__ import annotations

import torch
from torch import Tensor

from unip.models.vit import VisionTransformer


def last_layer_features(model: VisionTransformer, image: Tensor) -> Tensor:
    """Output tokens of the last block (before the final norm) of one image ``[3, H, W]``: ``[C, rows, cols]``."""
    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode():
        return model.forward_intermediates(image.unsqueeze(0).to(device), indices=1)[0][0].float().cpu()


def pca_rgb(features: Tensor) -> Tensor:
    """Project ``[C, rows, cols]`` features on their first three principal components, each scaled to [0, 1]
    (1st/99th percentile): float32 ``[rows, cols, 3]`` to show as an RGB image."""
    channels, rows, cols = features.shape
    flat = features.reshape(channels, -1).T.double()
    flat = flat - flat.mean(dim=0)
    _, _, basis = torch.linalg.svd(flat, full_matrices=False)
    components = flat @ basis[:3].T
    if components.shape[1] < 3:
        components = torch.cat([components, components.new_zeros(components.shape[0], 3 - components.shape[1])], 1)
    low, high = torch.quantile(components, 0.01, dim=0), torch.quantile(components, 0.99, dim=0)
    scaled = (components - low) / (high - low).clamp_min(1e-12)
    return scaled.clamp(0, 1).float().reshape(rows, cols, 3)

"""Semantic segmentation on top of the backbone: building, saving and loading segmentors, inference,
metrics, the loss and layer-wise lr decay of the fine-tuning recipe."""

from unip.seg.build import build_segmentor
from unip.seg.checkpoint import load_segmentor, save_segmentor
from unip.seg.inference import fit_size, predict_probabilities, slide_inference, whole_inference
from unip.seg.layer_decay import layer_decay_lr_scale, layer_id
from unip.seg.loss import segmentation_losses
from unip.seg.metrics import confusion_matrix, segmentation_metrics

__all__ = ["build_segmentor", "confusion_matrix", "fit_size", "layer_decay_lr_scale", "layer_id",
           "load_segmentor", "predict_probabilities", "save_segmentor", "segmentation_losses",
           "segmentation_metrics", "slide_inference", "whole_inference"]

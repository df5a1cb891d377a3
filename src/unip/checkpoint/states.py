"""Training states (``checkpoints/step-*.pt``) read as model files, so that an intermediate state of a run can be
analysed, described, distilled from or fine-tuned like the run's final model.

A state holds the model's state dict under ``model`` and, under ``extra``, the header of the model file its run
writes (``extra.model_header``: the JSON document of ``student.safetensors`` or ``segmentor.safetensors``,
``Task.model_header``). ``read_checkpoint`` hands on that state dict with that header, so the architecture comes
from what built the model (heads per block, sin-cos table, segmentor config), never from the weight shapes.
Pre-training states written before states carried the header are rebuilt from the settings and the step plan they
store (student preset and shape, input size, the teacher block's heads); a fine-tuning state without the header is
refused with a pointer to the run's segmentor file.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Mapping, Tuple

from torch import Tensor

from unip.engine.checkpointing import MODEL_HEADER_KEY
from unip.errors import CheckpointError
from unip.models.presets import PRESETS


def is_training_state(content: Any) -> bool:
    """True for what ``unip.engine.checkpointing.save_state`` writes: a model state dict, a step, RNG states and
    ``extra`` entries."""
    return (isinstance(content, Mapping) and isinstance(content.get("model"), Mapping) and "step" in content
            and "rng" in content and isinstance(content.get("extra"), Mapping))


def state_as_model_file(state: Mapping[str, Any], source: str) -> Tuple[Dict[str, Tensor], str]:
    """``(state dict, header)`` of a training state as the model file of its run holds them: the model's weights
    and the JSON document of the file's header (``read_checkpoint`` hands it on as ``unip.config``), also naming
    the state's step and epoch (``training_state``). Raises ``CheckpointError`` when the state's architecture
    cannot be known."""
    extra = state["extra"]
    header = extra.get(MODEL_HEADER_KEY)
    if isinstance(header, str):
        try:
            document = json.loads(header)
        except ValueError as err:
            raise CheckpointError(f"{source}: corrupt extra.{MODEL_HEADER_KEY} ({err}); the training state was "
                                  "damaged after it was written") from err
        if not isinstance(document, dict):
            raise CheckpointError(f"{source}: extra.{MODEL_HEADER_KEY} is not a JSON object; the training state "
                                  "was damaged after it was written")
    else:
        document = _pretrain_header(extra, state.get("step"), source)
    document["training_state"] = {"step": state.get("step"), "epoch": state.get("epoch")}
    return dict(state["model"]), json.dumps(document)


def _pretrain_header(extra: Mapping[str, Any], step: Any, source: str) -> Dict[str, Any]:
    """The student file's header for a pre-training state that does not carry it: the student preset with the
    shape and heads per block of the step plan (``student shape``) at the run's input size. ``CheckpointError``
    for any other state."""
    config, plan = extra.get("config"), extra.get("plan")
    config = config if isinstance(config, Mapping) else {}
    plan = plan if isinstance(plan, Mapping) else {}
    try:
        student, data, shape = config["student"], config["data"], plan["student shape"]
        heads = [int(h) for h in shape["heads per block"]]
        size = int(plan.get("data.input_size", data["input_size"]))
        model = _preset(str(plan.get("student.model", student["model"])), source)
        model.update(embed_dim=int(shape["width"]), depth=int(shape["depth"]), num_heads=heads[0],
                     last_heads=heads[-1] if heads[-1] != heads[0] else None, img_size=[size, size],
                     drop_path_rate=0.0)
        normalization = {"mean": [float(data["mean"])] * 3, "std": [float(data["std"])] * 3}
    except (KeyError, TypeError, ValueError, IndexError):
        fine_tuning = isinstance(config.get("model"), Mapping)
        model_file = "segmentor.safetensors or checkpoints/best.safetensors" if fine_tuning else "student.safetensors"
        raise CheckpointError(f"{source}: a {'fine-tuning' if fine_tuning else 'training'} state (step {step}) that "
                              f"does not record its model's architecture (written by an older unip); read the "
                              f"model file its run wrote instead ({model_file})") from None
    return {"architecture": "VisionTransformer", "normalization": normalization, "preset": student["model"],
            "teacher": str((config.get("teacher") or {}).get("source")), "teacher_layer": plan.get("teacher layer"),
            "teacher_heads": plan.get("teacher heads"), "model": model}


def _preset(name: str, source: str) -> Dict[str, Any]:
    if name not in PRESETS:
        raise CheckpointError(f"{source}: the training state's student preset {name!r} is not one of this unip's; "
                              "read the run's student.safetensors instead")
    return dict(PRESETS[name])

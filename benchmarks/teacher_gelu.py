"""How far the teacher's tanh GELU (``--teacher-gelu tanh``) moves NMI-HAD's targets, next to bf16 storage.

Per layer, the attention logits of a teacher against the fp32 teacher with its exact GELU, on the same
generated thermal images: relative error ‖a − ref‖ / ‖ref‖ and mean KL(softmax(ref) ‖ softmax(a)) over rows
(what the distillation loss sees), for

* ``fp32+tanh`` – the tanh approximation alone,
* ``bf16``      – the default teacher of a bf16 run (weights stored in bf16, bf16 autocast),
* ``bf16+tanh`` – that teacher with the tanh GELU (on CUDA computed in the fc1 products' epilogue).

The teacher is randomly initialised unless ``--teacher-file`` names real weights (e.g. MAE-L). Runs on a CPU
(the epilogue itself only on CUDA: ``--device cuda``).

Usage: ``python benchmarks/teacher_gelu.py [--device cpu|cuda] [--teacher vit_large_patch16] [--teacher-file F]
[--layers 1,6,12,18,24] [--images 8] [--img-size 224] [--json FILE]``
"""

from __future__ import annotations

import argparse
import copy
from typing import Dict, List, Optional

import torch

from common import write_json
from fp8_teacher import every_layer_logits, layer_errors, thermal_images
from unip.distill.teacher import Teacher
from unip.models import create_model

VARIANTS = {"fp32+tanh": ("fp32", "tanh"), "bf16": ("bf16", "exact"), "bf16+tanh": ("bf16", "tanh")}


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--teacher", default="vit_large_patch16")
    parser.add_argument("--teacher-file", default=None, help="real teacher weights (any supported format)")
    parser.add_argument("--layers", default="1,6,12,18,24", help="layers to print (all are in --json)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.teacher_file:
        from unip.checkpoint import load_model

        base = load_model(args.teacher_file, img_size=args.img_size)
    else:
        base = create_model(args.teacher, img_size=args.img_size)
    base = base.eval().requires_grad_(False).to(device)
    images = thermal_images(args.images, args.img_size).to(device)
    reference = every_layer_logits(base, images)
    rows: Dict[str, List[Dict[str, float]]] = {}
    for name, (weights, gelu) in VARIANTS.items():
        # every block kept (layer = depth): the MLPs are switched as ``unip pretrain`` switches them
        teacher = Teacher(copy.deepcopy(base), base.depth).set_precision(weights).set_gelu(gelu)
        rows[name] = layer_errors(reference, every_layer_logits(teacher.model, images))
        del teacher

    result = {"device": str(device), "torch": torch.__version__,
              "teacher": args.teacher_file or f"{args.teacher} (random init)", "images": args.images,
              "per_layer": [{"layer": i + 1, **{name: values[i] for name, values in rows.items()}}
                            for i in range(len(reference))]}
    print(f"{'layer':>5}" + "".join(f"{name + ' rel.err':>20}{name + ' KL':>16}" for name in VARIANTS))
    for layer in (int(x) for x in args.layers.split(",")):
        if 1 <= layer <= len(reference):
            print(f"{layer:>5}" + "".join(f"{rows[name][layer - 1]['relative_error']:>20.2e}"
                                          f"{rows[name][layer - 1]['kl']:>16.2e}" for name in VARIANTS))
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()

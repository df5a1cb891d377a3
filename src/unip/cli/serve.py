"""``unip serve``: a local web page for predictions, attention and comparisons, with its HTTP API."""

from __future__ import annotations

import argparse

from unip.cli.app import WORKERS, TableChoices
from unip.cli.inference import add_compile_option, add_thermal_options, input_mapping
from unip.engine.config import integer, number
from unip.optional import require
from unip.text import byte_size


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="a local web page: drop frames or videos, see masks, temperatures per class "
                                     "and the backbone's attention",
                       description="Serve a web page (and its HTTP API, docs/serve.md) on this machine: drop images, "
                                   "FLIR radiometric JPEGs, FFF/SEQ/CSQ files and videos to see their masks, class "
                                   "areas and temperatures per class exactly as unip predict writes them; the "
                                   "backbone's per-layer attention profile and the attention map of a clicked "
                                   "patch; two checkpoints side by side, with per-class IoU when a label map is "
                                   "dropped too. "
                                   "Works offline (nothing is loaded from another site). Uploads live in a private "
                                   "temporary folder removed when the server stops (Ctrl-C).")
    p.add_argument("--checkpoint", action="append", default=[], metavar="FILE",
                   help="segmentor to serve (unip finetune's .safetensors or the release's fine-tuned .pth); repeat "
                        "to compare several (default: the demo's cached segmentor, made by unip demo)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; any other warns)")
    p.add_argument("--port", type=integer(0, 65535).option(), default=7860,
                   help="port (default 7860; 0: any free port, printed)")
    p.add_argument("--max-upload-mb", type=integer(1, 1 << 20).option(), default=512, metavar="MB",
                   help="largest upload in MiB (default 512); a larger one is refused (HTTP 413) as it streams in")
    p.add_argument("--queue-size", type=integer(1, 100_000).option(), default=32, metavar="N",
                   help="jobs that may wait for the model (default 32); one more is refused (HTTP 503)")
    p.add_argument("--keep-results", type=integer(1, 1_000_000).option(), default=100, metavar="N",
                   help="finished jobs whose files stay downloadable (default 100; older ones are removed)")
    p.add_argument("--dataset", choices=TableChoices("unip.data.datasets:named_with_classes"),
                   help="class names and palette of this data set (default: the checkpoint's, else ids)")
    p.add_argument("--every", type=integer(1).option(), default=1, metavar="N",
                   help="videos: predict every N-th frame (default 1; the page may ask for another)")
    p.add_argument("--batch-size", type=integer(1, 4096).option(), default=4,
                   help="frames per forward (default 4)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16", "auto"), default="fp32",
                   help="autocast dtype of predictions (as unip predict); the attention analysis runs in fp32")
    p.add_argument("--alpha", type=number(ge=0, le=1).option(float), default=0.5,
                   help="weight of the colour mask in the overlays to download (default 0.5)")
    p.add_argument("--workers", type=WORKERS, default=None, help="image reading/writing threads per prediction")
    add_compile_option(p)
    add_thermal_options(p)
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    for module in ("starlette", "uvicorn", "python_multipart"):
        require(module, "unip serve")
    from unip.seg.predict_run import PredictOptions
    from unip.serve.server import Server, ServeOptions, serve

    predict = PredictOptions(dataset=args.dataset, every=args.every, batch_size=args.batch_size, device=args.device,
                             precision=args.precision, alpha=args.alpha, workers=args.workers, progress=False,
                             mapping=input_mapping(args), compile=args.compile)
    options = ServeOptions(args.checkpoint, args.host, args.port, args.max_upload_mb, args.queue_size,
                           args.keep_results, predict)

    def ready(server: Server) -> None:
        models = "; ".join(f"{m.name} ({m.predict.classes.num_classes} classes, {m.predict.predictor.device})"
                           for m in server.models)
        print(f"serving {models}\nopen {server.url} (uploads up to {byte_size(options.max_upload_mb << 20)}, kept "
              "in a private folder removed at exit; Ctrl-C stops)", flush=True)

    serve(options, ready)
    return 0

"""Prediction of one upload by ``unip predict``'s own code, and the answer of ``POST /api/predict``.

Each upload runs through ``unip.seg.predict_run.predict_files`` with the served model (loaded once) into the job's
folder: the label maps, colour masks, overlays, annotated video and ``areas.json`` are the files ``unip predict``
writes for that input, and the answer's ``classes``, ``pixels``, ``percent`` (and any ``celsius_*`` column) are
read from that ``areas.json``, so the page and the API give what ``unip predict`` gives for the file, by
construction. :func:`run_predict` is the one place that calls into ``unip predict``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from PIL import Image

from unip.atomic import atomic_write_text
from unip.data.images import read_label
from unip.data.inputs import InputMapping
from unip.errors import DataError
from unip.seg.metrics import confusion_matrix, segmentation_metrics
from unip.seg.predict_run import CSV_FILE, FORMATS, JSON_FILE, PredictOptions, areas_csv, predict_files
from unip.seg.render import ClassInfo
from unip.serve.jobs import Job, JobCancelled
from unip.serve.models import ServedModel
from unip.serve.uploads import Upload
from unip.serve.views import input_view

#: What ``POST /api/predict`` takes, by content (``unip.serve.uploads.classify``) → how the page says it.
PREDICT_KINDS = {"image": "images (PNG, JPEG including FLIR radiometric JPEGs, TIFF, BMP, WebP; 8 or 16 bit)",
                 "thermal": "FLIR FFF frames and SEQ/CSQ sequences",
                 "video": "videos (MP4, AVI, MKV, MPEG, WMV)"}
#: What a label file for per-class IoU may be.
LABEL_KINDS = {"image": "a label map (PNG of class ids)"}


def run_predict(model: ServedModel, upload: Upload, out: str, options: PredictOptions, job: Job) -> Dict[str, Any]:
    """``unip predict`` on the stored upload into ``out`` with the served model; returns its ``areas.json``
    document (``complete`` false when the job was cancelled part way). Raises ``DataError`` (the upload's name in
    place of where it is stored) when the file cannot be read."""
    run = dataclasses.replace(options, out=out, formats=list(FORMATS), progress=False, on_progress=job.progress)
    try:
        predict_files(model.checkpoint, [upload.path], run, model=model.predict)
    except JobCancelled:
        if not os.path.isfile(os.path.join(out, JSON_FILE)):
            raise
    except DataError as err:
        raise DataError(str(err).replace(upload.path, upload.name)) from None
    with open(os.path.join(out, JSON_FILE), encoding="utf-8") as handle:
        document = json.load(handle)
    if not document["images"]:
        reasons = "; ".join(f["reason"] for f in document["failed"]) or "nothing could be read"
        raise DataError(f"{upload.name}: {reasons.replace(upload.path, upload.name)}")
    return document


def predict_upload(model: ServedModel, upload: Upload, label: Optional[Upload], options: PredictOptions,
                   job: Job) -> Dict[str, Any]:
    """The work of a predict job: the answer of ``POST /api/predict`` (docs/serve.md), its files registered in
    ``job.files``. A cancelled video raises ``JobCancelled`` carrying the frames done."""
    out = os.path.join(job.folder, "out")
    document = run_predict(model, upload, out, options, job)
    result = answer(model, upload, document, out, job, options.mapping)
    if label is not None:
        result.update(label_scores(label, result, model.predict.classes, out, document))
    if not document["complete"]:
        raise JobCancelled(result)
    return result


def answer(model: ServedModel, upload: Upload, document: Dict[str, Any], out: str, job: Job,
           mapping: Optional[InputMapping] = None) -> Dict[str, Any]:
    """The JSON answer for ``document`` (predict's report of the upload): the class list and, per image or video
    frame, its record's areas as ``areas.json`` lists them, with the URLs of its files."""
    base = f"/api/jobs/{job.id}/files/"
    result: Dict[str, Any] = {"job": job.id, "input": upload.name, "kind": upload.kind, "checkpoint": model.name,
                              "classes": document["classes"], "palette": document["palette"],
                              "complete": document["complete"]}
    records = document["images"]
    for record in records:
        record["input"] = upload.name
    downloads = {CSV_FILE: _write(job, CSV_FILE, areas_csv(records, model.predict.classes)),
                 JSON_FILE: _write(job, JSON_FILE, json.dumps({**document, "checkpoint": model.name}, indent=1))}
    if records[0]["frame"] is None:
        record = records[0]
        result.update(areas(record), width=record["width"], height=record["height"])
        result.update(_file_urls(job, out, record, "", base))
        view = input_view(upload.path, mapping)
        job.files["view.png"] = view.save(os.path.join(job.folder, "view.png"))
        result.update(view_url=base + "view.png", thermal=view.scale)
    else:
        result["frames"] = [{"frame": r["frame"], "time_s": r["time_s"], "width": r["width"], "height": r["height"],
                             **areas(r), **_file_urls(job, out, r, f"frames/{r['frame']:06d}/", base)}
                            for r in records]
        for video in document["videos"]:
            job.files["video.mp4"] = os.path.join(out, video)
            downloads["video.mp4"] = "video.mp4"
    for name in ("label.png", "overlay.png", "color.png"):
        if name in job.files:
            downloads[name] = name
    result["downloads"] = {name: base + key for name, key in downloads.items()}
    return result


def areas(record: Dict[str, Any]) -> Dict[str, List[Any]]:
    """The per-class columns of an ``areas.json`` record, as it lists them: ``pixels``, ``percent`` and any
    ``celsius_*``."""
    return {key: value for key, value in record.items() if key in ("pixels", "percent") or key.startswith("celsius_")}


def _file_urls(job: Job, out: str, record: Dict[str, Any], prefix: str, base: str) -> Dict[str, str]:
    urls = {}
    for fmt, relative in record["files"].items():
        key = f"{prefix}{fmt}.png"
        job.files[key] = os.path.join(out, relative)
        urls[f"{fmt}_url"] = base + key
    return urls


def _write(job: Job, name: str, text: str) -> str:
    path = os.path.join(job.folder, name)
    atomic_write_text(path, text)
    job.files[name] = path
    return name


def label_scores(label: Upload, result: Dict[str, Any], classes: ClassInfo, out: str,
                 document: Dict[str, Any]) -> Dict[str, Any]:
    """Per-class ``iou`` (percent; None for a class absent from both), ``mIoU``, ``mAcc``, ``aAcc`` of the prediction
    against the label map ``label``, as ``unip evaluate`` computes them (255 ignored); or ``label_error`` saying why
    the label cannot be compared."""
    try:
        if "frames" in result:
            raise DataError("a label map goes with a single image, not a video")
        truth = read_label(label.path, max_id=65535)
        predicted = np.asarray(Image.open(os.path.join(out, document["images"][0]["files"]["label"])))
        if truth.shape != predicted.shape:
            raise DataError(f"it is {truth.shape[1]}x{truth.shape[0]} pixels, the prediction "
                            f"{predicted.shape[1]}x{predicted.shape[0]}")
        confusion = confusion_matrix(torch.from_numpy(predicted.astype(np.int64)),
                                     torch.from_numpy(truth.astype(np.int64)), classes.num_classes)
    except DataError as err:
        return {"label": label.name, "label_error": f"{label.name}: {str(err).replace(label.path, label.name)}"}
    scores = segmentation_metrics(confusion)
    shown = {key: _percent(scores[key]) for key in ("mIoU", "mAcc", "aAcc")}
    return {"label": label.name, "iou": [_percent(v) for v in scores["IoU"]], **shown}


def _percent(value: float) -> Optional[float]:
    return None if np.isnan(value) else round(float(value), 4)

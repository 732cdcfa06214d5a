"""Every group, dataset and attribute name of a featlab activation cache, and the schema version.

A cache is one HDF5 file readable with plain h5py. The writer creates every dataset and
attribute before the first sample is written, with storage allocated up front, so the file's
metadata never changes after it is made: afterwards values are written in place, rows and flags
while samples stream, the session records (``resumed``, ``finished``: fixed-size attributes) and
``complete`` outside the stream. A reader, plain h5py included, can open it at any moment, and a
process killed at any instant leaves a file that re-opens and resumes. The order of writes per
batch is: feature/label/stat rows, flush, then the batch's ``written`` flags, flush.

Layout (N samples, points P, input H x W)::

    /                              attrs: see ROOT_ATTRS
    /ids            [N]            fixed-length UTF-8 bytes, the data set's sample ids, in order
    /index          [N]   int64    the sample's index in the data set
    /written        [N]   uint8    1 once every array row of that sample is on disk
    /labels         [N, H, W] uint8   class index per pixel, 255 = ignore
    /images         [N, 3, H, W] uint8  optional (``save_images``): the input image, 0-255
    /points/<name>  [N, C, h, w]   float16|float32, chunks (k, C, h, w); attrs: POINT_ATTRS
                                 (+ POINT_OPTIONAL_ATTRS)
    /stats/nonfinite [N, P] int64  count of NaN/Inf values of the stored array per sample and point
                                 (P in point order; float16 overflow counts)
    /stats/abs_error [N, P] float32  float16 rounding error per sample and point, as its attribute
                                 ``statistic`` says (absent in older caches: exact). "bound":
                                 half the float16 spacing at the largest finite |stored|;
                                 "exact": max |x - float32(stored)| over finite x. 0 for
                                 float32; inf where a finite x overflowed float16

A cache written by several processes (``torchrun``) is a main file whose datasets are HDF5
virtual datasets over per-rank shard files in ``<name>.shards/`` next to it; readers (featlab's
or plain h5py) see one cache. Each shard ``rank-<r>-of-<K>.h5`` has the layout above for its
contiguous range of the sorted samples (``num_samples`` = its rows; ``/index`` holds the global
sample indices) and the extra root attribute ``shard``. The virtual datasets name their sources
relative to the main file's folder, so the cache and its ``.shards`` folder move together; rows
of a missing shard read as 0, ``written`` included. ``featlab merge`` (:mod:`featlab.cache.merge`)
copies such a cache into one file of this layout (``world_size`` stays K).

Chunks of ``/points/*``, ``/labels`` and ``/images`` hold whole samples (k rows of ~1-4 MB,
aligned with the extraction batches); ``/ids``, ``/index``, ``/written`` and ``/stats/*`` are
contiguous. No compression, unless asked for (``compression="lzf"|"gzip"``): then
``/points/*``, ``/labels`` and ``/images`` carry h5py's shuffle and lzf/gzip filters, applied
when the cache is finalised (:func:`featlab.cache.h5file.finalize`).
"""

from __future__ import annotations

SCHEMA = "featlab-cache"
SCHEMA_VERSION = 1

PARTIAL_SUFFIX = ".partial"  # a cache being written; renamed to the final name when complete
SHARDS_SUFFIX = ".shards"  # folder of per-rank shard files of a distributed cache
CREATING_SUFFIX = ".creating"  # a partial file while its metadata is made (renamed to .partial)
ASSEMBLING_SUFFIX = ".assembling"  # the virtual main file of a sharded cache while it is written
COMPRESSING_SUFFIX = ".compressing"  # the compressed copy of a finished partial file (compression)
MERGING_SUFFIX = ".merging"  # the one-file copy of a sharded cache while featlab merge writes it
LOCK_SUFFIX = ".lock"  # held (flock) by the extraction writing a cache; removed when it ends

# datasets
IDS = "ids"
INDEX = "index"
WRITTEN = "written"
LABELS = "labels"
IMAGES = "images"
POINTS = "points"  # group: one dataset per skip point, named by the point's name
STATS = "stats"  # group
NONFINITE = "stats/nonfinite"
ABS_ERROR = "stats/abs_error"

# root attributes: name -> meaning (documented in the README's format table)
ROOT_ATTRS = {
    "schema": f"always {SCHEMA!r}",
    "schema_version": "integer format version",
    "complete": "True once every sample is written and the file was finalised",
    "num_samples": "N",
    "point_names": "JSON list of point names, in execution order (= columns of /stats/*)",
    "model": "JSON BackboneSpec: model name, weights identity and sha256, mean, std",
    "data": "JSON data set settings: name, split, root, size, seed, ...",
    "classes": "JSON list of class names",
    "ignore_index": "label value of ignored pixels (255)",
    "ids_sha256": "sha256 of the newline-joined sample ids (the fingerprint joins check)",
    "input_size": "JSON [H, W] of the network input",
    "dtype": "storage dtype of the point arrays",
    "max_size": "largest stored grid side (area pooling above it, aspect kept), 0 = no pooling",
    "settings": "JSON of every extraction setting (the identity checked on resume)",
    "versions": "JSON featlab, torch, torchvision, h5py, numpy, python versions",
    "runtime": "JSON device, world size, training flag, AMP, cudnn/deterministic flags",
    "created": "ISO 8601 time the cache was started",
    "world_size": "number of processes that wrote it (>1: shards, joined by virtual datasets "
                  "or copied into one file by featlab merge)",
}

# The session records. A file featlab creates has both from the start, empty: fixed-length ASCII
# strings of SESSION_ATTR_BYTES bytes, null-padded, whose value a session rewrites in place, so
# that the partial file's metadata never changes after its creation (an empty value = no record;
# a file finalised elsewhere, e.g. merged from shards, may hold them as plain strings; caches of
# featlab before 2026-12-05 lack them).
FINAL_ATTRS = {
    "finished": "JSON list, a record per finalised file (per shard when sharded): rank, the rows "
                "the finishing session computed of the file's (fewer: it resumed, and earlier "
                "sessions wrote the rest), time, device, threads, versions; empty in partial files",
}
RESUME_ATTRS = {
    "resumed": "JSON list, a record per session that resumed the partial file (per shard when "
               "sharded), in order: rank, the rows already written when it began (skipped) of "
               "the file's (of), time, device, threads, versions; empty when none resumed it",
}
SESSION_ATTR_BYTES = {"finished": 8192, "resumed": 32768}  # a record is ~0.4-3 KiB

# root attributes of shard files only
SHARD_ATTRS = {
    "shard": "JSON {rank, world_size, start, stop}: the global sample range [start, stop) it holds",
}

# attributes of each /points/<name> dataset
POINT_ATTRS = {
    "skip_point": "JSON SkipPoint record (size = the network's output size; aliases: outer "
                  "modules returning the same tensor, which the reader accepts as its name)",
    "stored_size": "JSON [h, w] stored after pooling",
    "pooling": "'none' or 'area' (adaptive average pooling to stored_size)",
}

# optional attributes of a /points/<name> dataset
POINT_OPTIONAL_ATTRS = {
    "channels": "JSON list of the network channels stored, increasing (written when max_channels "
                "kept fewer than the point has; absent: every channel, in order)",
}

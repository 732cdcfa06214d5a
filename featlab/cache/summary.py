"""What a cache holds, as a JSON-ready dict, as text (``featlab inspect``, ``repr``) and as HTML.

Examples:
    >>> print(inspect_cache("val.h5"))  # doctest: +SKIP
    featlab cache val.h5 (featlab-cache v1)
      status    complete: 500 of 500 samples written
      ...
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import numpy as np

from featlab.cache import schema
from featlab.cache._reading import decode_attr, source_files, storage_bytes

__all__ = ["summary", "format_summary", "summary_html", "inspect_cache", "human_bytes"]


def human_bytes(n: int | float) -> str:
    """Binary-prefixed size.

    Examples:
        >>> human_bytes(512), human_bytes(3 * 2**20)
        ('512 B', '3.0 MiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def summary(cache) -> dict:
    """Everything ``featlab inspect`` shows, as a JSON-serialisable dict.

    Args:
        cache: a :class:`~featlab.cache.reader.CacheReader` or a cache path.

    Returns:
        A dict with ``path``, ``schema``, ``schema_version``, ``complete``, ``in_progress``,
        ``written``, ``total``, ``model``, ``data``, ``classes``, ``ignore_index``,
        ``ids_sha256``, ``input_size``, ``dtype``, ``error_stat`` (what ``/stats/abs_error``
        holds: ``bound`` or ``exact``), ``max_size``, ``versions``, ``created``, ``finished``
        (the session that finalised each file; None before featlab recorded it), ``resumed``
        (each session that resumed a partial file; None when none did),
        ``world_size``, ``has_images``, ``points`` (per point: its SkipPoint record plus
        ``stored_size``, ``pooling``, ``shape`` [N, C, h, w], ``dtype``, ``bytes`` on disk,
        ``bytes_per_sample``, ``compression`` (None, ``"lzf"``, ``"gzip"``),
        ``stored_channels`` (fewer than ``channels`` with ``max_channels``; which ones:
        ``reader.stored_channels``), and over the written samples ``nonfinite``,
        ``max_abs_error`` and ``overflow_samples`` (see :func:`_point_stats`)), ``arrays``
        (labels/images/stats: shape, dtype, bytes), ``files`` and ``file_size`` (bytes of the
        main file plus any shard files).
    """
    from featlab.cache.reader import CacheReader, open_cache

    if not isinstance(cache, CacheReader):
        with open_cache(cache) as opened:
            return summary(opened)
    f = cache._h5()
    n = cache.num_samples
    stats = _point_stats(f, len(cache.points))
    points = []
    for p, stat in zip(cache.points, stats):
        dset = f[f"{schema.POINTS}/{p.name}"]
        record = p.to_dict()
        record.update(rf_status=p.rf_status, stored_size=list(cache.stored_size(p.name)),
                      pooling=str(decode_attr(dset.attrs.get("pooling", "none"))),
                      shape=list(dset.shape),
                      dtype=str(dset.dtype), bytes=storage_bytes(dset, cache.path),
                      bytes_per_sample=int(dset.dtype.itemsize * _prod(dset.shape[1:])),
                      stored_channels=len(cache.stored_channels(p.name)),
                      compression=dset.compression, **stat)
        points.append(record)
    arrays = {}
    for key in (schema.LABELS, schema.IMAGES, schema.NONFINITE, schema.ABS_ERROR):
        if key in f:
            arrays[key] = {"shape": list(f[key].shape), "dtype": str(f[key].dtype),
                           "bytes": storage_bytes(f[key], cache.path)}
    files = [cache.path, *sorted(set(source_files(f, cache.path).values()))]
    return {
        "path": str(cache.path),
        "schema": schema.SCHEMA,
        "schema_version": cache.schema_version,
        "complete": cache.complete,
        "in_progress": cache.path.name.endswith(schema.PARTIAL_SUFFIX),
        "written": len(cache),
        "total": n,
        "model": cache.model,
        "data": cache.data,
        "classes": list(cache.classes),
        "ignore_index": cache.ignore_index,
        "ids_sha256": cache.ids_sha256,
        "input_size": list(cache.input_size),
        "dtype": cache.dtype,
        "error_stat": (str(decode_attr(f[schema.ABS_ERROR].attrs.get("statistic", "exact")))
                       if schema.ABS_ERROR in f else None),
        "max_size": cache.max_size,
        "versions": cache.versions,
        "created": cache.created,
        "finished": cache.finished,
        "resumed": cache.resumed,
        "world_size": cache.world_size,
        "has_images": cache.has_images,
        "points": points,
        "arrays": arrays,
        "files": [str(p) for p in files],
        "file_size": sum(os.path.getsize(p) for p in files if Path(p).is_file()),
    }


def _point_stats(f, num_points: int) -> list[dict]:
    """Per point, over the written samples: ``nonfinite`` (NaN/Inf values in all), and from
    ``/stats/abs_error`` ``max_abs_error`` (the largest finite value; None before any sample is
    written) and ``overflow_samples`` (samples whose error is inf: a value overflowed float16)."""
    written = f[schema.WRITTEN][...].astype(bool)
    columns = {}
    for key in (schema.NONFINITE, schema.ABS_ERROR):
        columns[key] = (f[key][...][written] if key in f
                        else np.zeros((int(written.sum()), num_points)))
    out = []
    for k in range(num_points):
        error = columns[schema.ABS_ERROR][:, k]
        finite = error[np.isfinite(error)]
        out.append({"nonfinite": int(columns[schema.NONFINITE][:, k].sum()),
                    "max_abs_error": float(finite.max()) if finite.size else None,
                    "overflow_samples": int(np.isinf(error).sum())})
    return out


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def _status(info: dict) -> str:
    w, n = info["written"], info["total"]
    if info["complete"]:
        return f"complete: {w} of {n} samples written"
    state = "in progress" if info["in_progress"] else "INCOMPLETE (not finalised)"
    return f"{state}: {w} of {n} samples written ({n - w} to go)"


def _model_line(model) -> str:
    if not isinstance(model, dict):
        return "?"
    line = f"{model.get('name', '?')}  weights {model.get('weights', '?')}"
    if model.get("weights_sha256"):
        line += f" (sha256 {model['weights_sha256'][:12]})"
    if model.get("seed") is not None and model.get("weights") == "none":
        line += f"  seed {model['seed']}"
    return line


def _data_line(info: dict) -> str:
    data = info["data"] if isinstance(info["data"], dict) else {}
    line = f"{data.get('name', '?')}/{data.get('split', '?')}"
    extra = [f"{k} {data[k]}" for k in ("size", "seed", "root") if data.get(k) is not None]
    return "  ".join([line, *extra])


def _rf(p: dict) -> str:
    return "?" if p.get("rf_size") is None else str(p["rf_size"])


def _point_rows(info: dict) -> list[list[str]]:
    rows = []
    for p in info["points"]:
        shape = "x".join(str(s) for s in p["shape"][1:])
        pooled = "" if p["pooling"] == "none" else f" (area from {p['size'][0]}x{p['size'][1]})"
        if p["stored_channels"] != p["channels"]:
            pooled += f" ({p['stored_channels']} of {p['channels']} channels)"
        rows.append([p["name"], shape + pooled, str(p["stride"]), _rf(p), p["dtype"],
                     _error(p), str(p["nonfinite"]), human_bytes(p["bytes"])])
    return rows


def _error(p: dict) -> str:
    if p["dtype"] != "float16" or p["max_abs_error"] is None and not p["overflow_samples"]:
        return "-"
    text = "" if p["max_abs_error"] is None else f"{p['max_abs_error']:.2e}"
    if p["overflow_samples"]:
        text += f"{', ' if text else ''}inf in {p['overflow_samples']}"
    return text


_POINT_HEADER = ["point", "stored C x h x w", "stride", "rf", "dtype", "max error", "NaN/Inf",
                 "on disk"]


def format_summary(info: dict) -> str:
    """The text of ``featlab inspect`` (and of a reader's ``repr``) from :func:`summary`."""
    size = info["input_size"]
    lines = [
        f"featlab cache {info['path']} ({info['schema']} v{info['schema_version']})",
        f"  status    {_status(info)}",
        f"  model     {_model_line(info['model'])}",
        f"  data      {_data_line(info)}; {len(info['classes'])} classes, ignore "
        f"{info['ignore_index']}; ids sha256 {(info['ids_sha256'] or '?')[:12]}",
        f"  input     {'x'.join(map(str, size)) or '?'}  dtype {_dtype(info)}  max_size "
        f"{info['max_size']}{' (no pooling)' if not info['max_size'] else ''}",
    ]
    table = [_POINT_HEADER, *_point_rows(info)]
    widths = [max(len(r[i]) for r in table) for i in range(len(_POINT_HEADER))]
    for i, row in enumerate(table):
        cells = "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
        lines.append(f"  {'points' if i == 0 else '':<8}  {cells}")
    arrays = info["arrays"]
    labels = arrays.get(schema.LABELS, {}).get("bytes", 0)
    images = arrays.get(schema.IMAGES)
    points_bytes = sum(p["bytes"] for p in info["points"])
    nfiles = len(info["files"])
    packed = sorted({p["compression"] for p in info["points"] if p.get("compression")})
    lines.append(f"  sizes     points {human_bytes(points_bytes)}"
                 + (f" ({', '.join(packed)}-compressed)" if packed else "")
                 + f", labels {human_bytes(labels)}, "
                 f"images {human_bytes(images['bytes']) if images else 'not stored'}; file "
                 f"{human_bytes(info['file_size'])}"
                 + (f" in {nfiles} files (world size {info['world_size']})" if nfiles > 1 else ""))
    lines += [f"  {label:<9} {text}" for label, text in _provenance(info)]
    return "\n".join(lines)


def _provenance(info: dict) -> list[tuple[str, str]]:
    """Who computed the rows, in order: the versions and start of the first session, each
    session that resumed a file, then the session that finished each file after a resume."""
    versions = dict(info["versions"]) if isinstance(info["versions"], dict) else {}
    made_by = ([("command", versions.pop("command") or "none (made from Python)")]
               if "command" in versions else [])
    out = [("versions", (", ".join(f"{k} {v}" for k, v in versions.items() if v is not None)
                         or "?") + f"; created {info['created'] or '?'}"), *made_by]

    def made(r: dict) -> str:
        return (f"({r.get('device', '?')}, featlab "
                f"{(r.get('versions') or {}).get('featlab', '?')}, {r.get('time', '?')})")

    out += [("resumed", f"rank {r['rank']}: a session resumed it at {r['skipped']} of {r['of']} "
                        f"rows {made(r)}") for r in info.get("resumed") or []]
    finishers = [r for r in info.get("finished") or [] if r.get("rows", 0) < r.get("of", 0)]
    if finishers:  # rows from more than one session: say which session finished what
        out.append(("resumed", "; ".join(
            f"rank {r['rank']}: the session that finished it computed {r['rows']} of "
            f"{r['of']} rows {made(r)}" for r in finishers) + "; earlier sessions the rest"))
    return out


def _dtype(info: dict) -> str:
    if info["dtype"] == "float16" and info.get("error_stat"):
        return f"float16 (rounding error: {info['error_stat']})"
    return str(info["dtype"])


def summary_html(info: dict) -> str:
    """An HTML table of :func:`summary` for Jupyter (``_repr_html_``)."""
    e = html.escape
    facts = [("status", _status(info)), ("model", _model_line(info["model"])),
             ("data", _data_line(info) + f"; {len(info['classes'])} classes"),
             ("input", f"{'x'.join(map(str, info['input_size']))}, dtype {_dtype(info)}, "
                       f"max_size {info['max_size']}"),
             ("file", f"{human_bytes(info['file_size'])} in {len(info['files'])} file(s)"),
             ("ids sha256", (info["ids_sha256"] or "?")[:16]), *_provenance(info)]
    head = "".join(f"<th>{e(h)}</th>" for h in _POINT_HEADER)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                   for row in _point_rows(info))
    dl = "".join(f"<tr><th style='text-align:left'>{e(k)}</th><td style='text-align:left'>"
                 f"{e(v)}</td></tr>" for k, v in facts)
    return (f"<div class='featlab-cache'><b>featlab cache</b> <code>{e(info['path'])}</code>"
            f"<table>{dl}</table><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
            f"</table></div>")


def inspect_cache(path, *, as_json: bool = False) -> str:
    """What ``featlab inspect CACHE [--json]`` prints: the summary as text or as JSON."""
    info = summary(path)
    return json.dumps(info, indent=2) if as_json else format_summary(info)

"""The layout of a qkprobe run file (HDF5), shared by the writer, the reader and ``recover``.

``docs/format.md`` describes the same layout for people. Names of statistics are not fixed
here: the caller passes them and they are stored in ``/statistic_names``.

Strings that grow while a file is written (sample ids, skipped inputs) are stored as a
*string column*: a group with ``utf8`` (nbytes,) uint8, the concatenated UTF-8 bytes, and
``end`` (n,) int64, the exclusive end offset of string i in ``utf8``. HDF5 variable-length
strings live in the global heap, which SWMR readers cannot read while the file is being
written ("len not positive after adjustment for EOA"), so they are used only for strings
written once before SWMR starts (attributes, ``/statistic_names``).
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

SCHEMA_VERSION = 1

# Library version bounds: SWMR needs the 1.10 file format; capping the upper bound at 1.10
# keeps files readable by any HDF5 >= 1.10 (e.g. h5py wheels built on HDF5 1.14).
LIBVER = ("v110", "v110")

# /committed: (3,) int64 written with one small write after everything it covers is flushed.
COMMITTED = "committed"
COMMIT_FIELDS = ("rows", "skipped", "snapshot_generation", "series")
ROWS, SKIPPED, GENERATION, SERIES_POINTS = range(4)

SAMPLE_ID = "samples/id"          # string column, one id per row
SAMPLE_STEP = "samples/step"      # (rows,) int64, -1 when there is no training step
SAMPLE_LABEL = "samples/label"    # string column, the class label of each row ("" = none)
SKIPPED_ID = "skipped/id"         # string column, inputs that could not be read
SKIPPED_REASON = "skipped/reason"  # string column, why (same length as skipped/id)
STRING_BYTES = "utf8"
STRING_END = "end"

STAT_NAMES = "statistic_names"    # (S,) strings, dimension scale of every stats' last axis
LAYERS = "layers"
STATS = "stats"                   # (rows, H, R, S) per layer, only when per_sample
SNAPSHOT = "snapshot"             # group of (2, *shape) arrays: two slots, see snapshot_slot()
BASES = "bases"
SERIES = "series"                 # per layer: group of (points, *shape) time-series datasets
SERIES_STEP = "series/step"       # (points,) int64: the step of each time-series point
HEAD_INDEX = "head_index"
MODE_INDEX = "mode_index"
STATS_DIMS = ("sample", "head", "mode", "statistic")

JSON_KEYS = "json_keys"           # attribute listing the attributes stored as JSON text
WRITER_PID = "writer_pid"
WRITER_HOST = "writer_host"
RESERVED_ROOT_ATTRS = frozenset({
    "schema_version", "qkprobe_version", "created", JSON_KEYS, WRITER_PID, WRITER_HOST,
    "per_sample", "store_dtype", "compression", "chunk_rows",
})
RESERVED_LAYER_ATTRS = frozenset({"name", "num_heads", "num_modes", JSON_KEYS})

STRING_COLUMNS = (SAMPLE_ID, SKIPPED_ID, SKIPPED_REASON, SAMPLE_LABEL)


def layer_path(index: int, num_layers: int) -> str:
    """``layers/07``: zero-padded (at least 2 digits) so that names sort like indices."""
    width = max(2, len(str(max(num_layers - 1, 0))))
    return f"{LAYERS}/{index:0{width}d}"


def snapshot_slot(generation: int) -> int:
    """Which of the two slots of every snapshot array holds the committed values.

    The writer writes a new snapshot into the other slot, flushes, and only then publishes
    the new generation in ``/committed``: a crash never leaves a half-written snapshot, nor
    one that counts rows the counter does not cover.
    """
    return int(generation) % 2


def encode_attrs(target, values: Mapping[str, Any]) -> None:
    """Store ``values`` as HDF5 attributes of ``target`` (a group or file).

    str values are stored as they are; anything else (dict, list, number, bool, None) as
    JSON text, and its key is listed in the ``json_keys`` attribute so readers decode it.
    """
    json_keys = set(_json_keys(target))
    for key, value in values.items():
        if isinstance(value, str):
            target.attrs[key] = value
            json_keys.discard(key)
        else:
            target.attrs[key] = json.dumps(value, default=_json_default, sort_keys=True)
            json_keys.add(key)
    target.attrs[JSON_KEYS] = json.dumps(sorted(json_keys))


def decode_attrs(target, skip: Iterable[str] = (JSON_KEYS,)) -> dict:
    """Read back the attributes of ``target``: JSON ones decoded, bytes as str, numpy as python."""
    json_keys = set(_json_keys(target))
    skip = set(skip)
    out = {}
    for key, value in target.attrs.items():
        if key in skip:
            continue
        value = to_python(value)
        out[key] = json.loads(value) if key in json_keys else value
    return out


def _json_keys(target) -> list:
    raw = target.attrs.get(JSON_KEYS)
    return json.loads(to_python(raw)) if raw is not None else []


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def to_python(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def join_strings(strings: Sequence[str], offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Encode strings for a string column whose ``utf8`` already holds ``offset`` bytes.

    Returns ``(blob, ends)``: blob (nbytes,) uint8, ends (n,) int64 absolute end offsets.
    """
    encoded = [s.encode("utf-8") for s in strings]
    blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
    return blob, offset + np.cumsum(lengths)


def split_strings(blob: np.ndarray, ends: np.ndarray, offset: int) -> list[str]:
    """Decode strings from ``blob`` (the ``utf8`` bytes starting at ``offset``) and their ends."""
    data = blob.tobytes()
    out, start = [], 0
    for end in (ends - offset).tolist():
        out.append(data[start:end].decode("utf-8"))
        start = end
    return out


def read_strings(group, start: int, stop: int) -> list[str]:
    """Strings ``start:stop`` of the string column ``group`` (an h5py group)."""
    if stop <= start:
        return []
    ends = group[STRING_END][start:stop]
    begin = int(group[STRING_END][start - 1]) if start > 0 else 0
    blob = group[STRING_BYTES][begin:int(ends[-1])]
    return split_strings(blob, ends, begin)


def string_column_nbytes(group, count: int) -> int:
    """Bytes of ``utf8`` used by the first ``count`` strings of a string column."""
    return int(group[STRING_END][count - 1]) if count > 0 else 0


def series_points(committed) -> int:
    """Committed time-series points of a commit record (0 for records without the field)."""
    return int(committed[SERIES_POINTS]) if len(committed) > SERIES_POINTS else 0


# Named dimensions (netCDF-4 conventions, so that xarray / h5netcdf open a layer group as a labelled
# Dataset): every dataset of a layer group, subgroups included, has each axis attached to a
# coordinate scale of the layer group, a 1-D dataset named like the dimension. ``sample`` and
# ``point`` grow with the rows and the time-series points; ``head`` holds the recorded heads'
# indices in the model, ``model_head`` all of the model's heads (only when a head subset is
# recorded; else arrays over all heads use ``head``).
DIM_SAMPLE, DIM_POINT, DIM_HEAD, DIM_MODEL_HEAD = "sample", "point", "head", "model_head"
DIM_MODE, DIM_STATISTIC, DIM_SLOT, DIM_SIGN, DIM_TOP = "mode", "statistic", "slot", "sign", "top"
DIM_FEATURE, DIM_KEY_FEATURE = "feature", "key_feature"
GROWING_DIMS = (DIM_SAMPLE, DIM_POINT)
SIGN_VALUES = ("pos", "neg")
#: Dimensions of the datasets of a layer group, by path inside it (fnmatch patterns, first match).
#: A dataset matching none, or whose shape disagrees with the scales, stays unlabelled (xarray
#: then gives it "phony" dimensions; mixing labelled and unlabelled axes is what it refuses).
LAYER_DIMS = (
    (STATS, (DIM_SAMPLE, DIM_HEAD, DIM_MODE, DIM_STATISTIC)),
    (HEAD_INDEX, (DIM_HEAD,)),
    (MODE_INDEX, (DIM_MODE,)),
    (f"{SNAPSHOT}/agg_*", (DIM_SLOT, DIM_HEAD, DIM_MODE, DIM_STATISTIC)),
    (f"{SNAPSHOT}/topk_*", (DIM_SLOT, DIM_HEAD, DIM_MODE, DIM_SIGN, DIM_TOP)),
    (f"{SNAPSHOT}/nonfinite_values", (DIM_SLOT,)),
    (f"{BASES}/U", (DIM_MODEL_HEAD, DIM_FEATURE, DIM_MODE)),
    (f"{BASES}/V", (DIM_MODEL_HEAD, DIM_KEY_FEATURE, DIM_MODE)),
    (f"{BASES}/key_bias_term", (DIM_MODEL_HEAD, DIM_KEY_FEATURE)),
    (f"{BASES}/*", (DIM_MODEL_HEAD, DIM_MODE)),
    (f"{SERIES}/S", (DIM_POINT, DIM_MODEL_HEAD, DIM_MODE)),
    (f"{SERIES}/cosine", (DIM_POINT, DIM_MODEL_HEAD, DIM_MODE)),
    (f"{SERIES}/drift_*", (DIM_POINT, DIM_MODEL_HEAD)),
    (f"{SERIES}/*", (DIM_POINT,)),
)


def layer_dims(path: str):
    """The dimension names of the dataset at ``path`` inside a layer group, or None."""
    from fnmatch import fnmatchcase
    return next((dims for pattern, dims in LAYER_DIMS if fnmatchcase(path, pattern)), None)

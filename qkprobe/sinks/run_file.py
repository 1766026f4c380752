"""Read a qkprobe run file, also while it is being written (SWMR).

Only committed data is returned: rows below the counter in ``/committed`` and the snapshot
slot that counter points to. ``refresh()`` moves to the writer's latest commit.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Union

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc filter used by stats)
import numpy as np

from ..errors import RunFileError
from . import schema, validate

LayerKey = Union[int, str]


def open_run(path) -> "RunFile":
    """Open a run file read-only; works while a writer in another process is adding to it."""
    return RunFile(path)


def read_metadata(path) -> dict:
    """The metadata of a run file (root attributes, JSON decoded), e.g. to check a resume."""
    with open_run(path) as run:
        return run.metadata


class RunFile:
    """A run file opened for reading. Shapes: rows committed samples, H heads, R modes, S statistics."""

    def __init__(self, path):
        self.path = Path(path)
        self._file = _open(self.path)
        try:
            self._check_schema()
            self._bind()
            self.refresh()
        except RunFileError:
            self._file.close()
            raise
        except (KeyError, IndexError, ValueError, TypeError, RuntimeError, OSError) as exc:
            self._file.close()
            raise validate.damaged(self.path, f"{type(exc).__name__}: {' '.join(str(exc).split())[:120]}") from exc
        except BaseException:
            self._file.close()
            raise

    # ---- structure ------------------------------------------------------------------------

    def _check_schema(self) -> None:
        version = self._file.attrs.get("schema_version")
        if version is None or schema.COMMITTED not in self._file:
            raise RunFileError(f"{self.path} is not a qkprobe run file; check the path.")
        if int(version) != schema.SCHEMA_VERSION:
            raise RunFileError(f"{self.path} has run-file schema version {int(version)}, but this qkprobe "
                               f"reads version {schema.SCHEMA_VERSION}; open it with a qkprobe release of "
                               f"that version.")

    def _bind(self) -> None:
        f = self._file
        self._committed = f[schema.COMMITTED]
        self._layers = [f[schema.LAYERS][key] for key in sorted(f[schema.LAYERS], key=int)]
        self.layer_names: list[str] = [schema.to_python(g.attrs["name"]) for g in self._layers]
        self.stat_names: list[str] = [schema.to_python(s) for s in f[schema.STAT_NAMES][()]]
        self.per_sample = bool(f.attrs.get("per_sample", True))
        self._rows = self._skipped = self._generation = 0
        self._checked = False
        self._ids: list[str] = []
        self._skipped_list: list[tuple[str, str]] = []

    # ---- commit state ---------------------------------------------------------------------

    def refresh(self) -> int:
        """Read the writer's latest commit; returns the committed rows (never fewer than before)."""
        rows, skipped, generation = self._read_committed()
        if not self._checked and (rows, skipped, generation) != (0, 0, 0):
            # The whole record against the datasets once; later commits of a live writer only
            # need the columns read below to hold what the record counts (checked there).
            validate.check_commit(self._file, self._committed[()], self.path)
            self._checked = True
        if rows > self._rows:
            self._ids.extend(self._read_column(schema.SAMPLE_ID, self._rows, rows))
            self._rows = rows
        if skipped > self._skipped:
            ids = self._read_column(schema.SKIPPED_ID, self._skipped, skipped)
            reasons = self._read_column(schema.SKIPPED_REASON, self._skipped, skipped)
            self._skipped_list.extend(zip(ids, reasons))
            self._skipped = skipped
        self._generation = max(self._generation, generation)
        return self._rows

    def _read_committed(self) -> tuple[int, int, int]:
        self._committed.refresh()
        state = self._committed[()]
        self._series_points = schema.series_points(state)
        return int(state[schema.ROWS]), int(state[schema.SKIPPED]), int(state[schema.GENERATION])

    def _read_column(self, path: str, start: int, stop: int) -> list[str]:
        group = self._file[path]
        group[schema.STRING_END].refresh()
        group[schema.STRING_BYTES].refresh()
        if group[schema.STRING_END].shape[0] < stop:
            raise validate.damaged(self.path, f"its commit record counts {stop} entries of {path} but it holds "
                                              f"{group[schema.STRING_END].shape[0]}")
        return schema.read_strings(group, start, stop)

    def __len__(self) -> int:
        return self._rows

    # ---- per-row data ---------------------------------------------------------------------

    @property
    def ids(self) -> list[str]:
        """Sample ids of the committed rows, in row order."""
        return list(self._ids)

    @property
    def labels(self) -> Optional[list[str]]:
        """Class labels of the committed rows, in row order ("" for a row without one); None when
        the file stores none (no row labelled, or a file from before labels)."""
        if schema.SAMPLE_LABEL not in self._file:
            return None
        cached = getattr(self, "_label_cache", [])
        if len(cached) < self._rows:
            cached = cached + self._read_column(schema.SAMPLE_LABEL, len(cached), self._rows)
            self._label_cache = cached
        labels = cached[:self._rows]
        return labels if any(labels) else None

    @property
    def steps(self) -> np.ndarray:
        """(rows,) int64 training step of each row (-1 when none)."""
        return self._read_rows(self._file[schema.SAMPLE_STEP], (slice(None),))

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(id, reason) of the committed skipped inputs."""
        return list(self._skipped_list)

    def stats(self, layer: LayerKey, stat: Optional[Union[str, int]] = None, head: Optional[int] = None,
              rows: Optional[slice] = None) -> np.ndarray:
        """Per-sample statistics of one layer, as stored (float32 or float16).

        Args:
            layer: layer index or module name.
            stat: a statistic name (or index); None for all.
            head: one head; None for all. One (layer, head) is the read the chunks are made for.
            rows: a slice of the committed rows; None for all.

        Returns:
            (rows, H, R, S), dropping the H axis when ``head`` is given and S when ``stat`` is.
        """
        group = self._layer(layer)
        if schema.STATS not in group:
            raise RunFileError(f"{self.path} has no per-sample statistics (it was written with "
                               f"per_sample=False); use its snapshot arrays instead.")
        selection = (slice(None) if head is None else int(head), slice(None),
                     slice(None) if stat is None else self._stat_index(stat))
        return self._read_rows(group[schema.STATS], selection, rows)

    def _read_rows(self, dataset: h5py.Dataset, selection: tuple, rows: Optional[slice] = None) -> np.ndarray:
        dataset.refresh()
        start, stop, step = (rows or slice(None)).indices(self._rows)
        if step < 1:
            raise RunFileError("Rows of a run file can only be read in increasing order; use a positive "
                               "slice step.")
        return dataset[(slice(start, max(start, stop), step),) + selection[: dataset.ndim - 1]]

    # ---- per-layer data -------------------------------------------------------------------

    def snapshot_names(self, layer: LayerKey) -> list[str]:
        """Names of the snapshot arrays of a layer."""
        return list(self._layer(layer)[schema.SNAPSHOT])

    def snapshot(self, layer: LayerKey, name: str) -> np.ndarray:
        """The committed value of a snapshot array (zeros before the first commit).

        If the writer moves on by more than one commit while the array is read, the reader
        refreshes and reads again, so the value may belong to a later commit than ``len(self)``.
        """
        group = self._layer(layer)[schema.SNAPSHOT]
        if name not in group:
            raise RunFileError(f"Layer {self.layer_names[self._layer_index(layer)]} of {self.path} has no "
                               f"snapshot array {name!r}; it has {sorted(group)}.")
        dataset = group[name]
        while True:
            generation = self._generation
            dataset.refresh()
            value = dataset[schema.snapshot_slot(generation)]
            # The writer only writes the slot of generation + 2 after publishing generation + 1.
            if self._read_committed()[2] <= generation:
                return value
            self.refresh()

    def committed_snapshots(self, attempts: int = 200) -> list[dict[str, np.ndarray]]:
        """Every layer's snapshot arrays, all of one commit, and ``len(self)`` refreshed to the
        rows of that commit or a later one (never fewer than the snapshot covers): what a merge
        or a resume needs from a file a writer may still be adding to."""
        for _ in range(attempts):
            self.refresh()
            generation = self._generation
            slot = schema.snapshot_slot(generation)
            values = []
            for group in self._layers:
                arrays = {}
                for name, dataset in group[schema.SNAPSHOT].items():
                    dataset.refresh()
                    arrays[name] = dataset[slot]
                values.append(arrays)
            # The writer only writes the slot of generation + 2 after publishing generation + 1.
            if self._read_committed()[2] <= generation:
                return values
            time.sleep(0.05)
        raise RunFileError(f"{self.path} kept changing while its snapshot was read; read it again.")

    # ---- time series (training) ------------------------------------------------------------

    @property
    def series_steps(self) -> np.ndarray:
        """(points,) int64: the step of each committed time-series point (basis refreshes)."""
        if schema.SERIES_STEP not in self._file:
            return np.zeros(0, np.int64)
        return self._read_points(self._file[schema.SERIES_STEP])

    def series_names(self, layer: LayerKey) -> list[str]:
        """Names of the time-series arrays of a layer (empty when the run logged none)."""
        return list(self._layer(layer).get(schema.SERIES, {}))

    def series(self, layer: LayerKey, name: str) -> np.ndarray:
        """(points, *shape) committed values of one time-series array of a layer."""
        group = self._layer(layer).get(schema.SERIES, {})
        if name not in group:
            raise RunFileError(f"Layer {self.layer_names[self._layer_index(layer)]} of {self.path} has no "
                               f"series {name!r}; it has {sorted(group)}.")
        return self._read_points(group[name])

    def _read_points(self, dataset: h5py.Dataset) -> np.ndarray:
        dataset.refresh()
        return dataset[: min(self._series_points, dataset.shape[0])]

    def bases(self, layer: LayerKey) -> dict[str, np.ndarray]:
        """The arrays written once for a layer (e.g. U, S, V, cosine), name → array."""
        return {name: ds[()] for name, ds in self._layer(layer)[schema.BASES].items()}

    def layer_attrs(self, layer: LayerKey) -> dict:
        """Attributes of a layer: name, num_heads, num_modes and the writer's extras."""
        return schema.decode_attrs(self._layer(layer))

    @property
    def metadata(self) -> dict:
        """Root attributes, JSON ones decoded: schema_version, qkprobe_version, created, caller's keys."""
        return schema.decode_attrs(self._file, skip=(schema.JSON_KEYS, schema.WRITER_PID, schema.WRITER_HOST))

    def to_xarray(self, layer: LayerKey):
        """The committed data of one layer as a labelled ``xarray.Dataset``.

        Variables: ``stats`` (sample, head, mode, statistic) when per-sample rows are stored, the
        snapshot arrays at their committed slot (``agg_mean`` (head, mode, statistic),
        ``topk_scores`` (head, mode, sign, top), ...), ``bases_<name>`` and ``series_<name>``.
        Coordinates: the layer's scales (``head`` holds the model's head indices, ``statistic`` the
        names) and, along ``sample``, ``id`` and ``step``. Attributes: the layer's attributes.
        """
        try:
            import xarray as xr
        except ImportError as exc:
            raise RunFileError("to_xarray needs xarray; install it (pip install xarray).") from exc
        group = self._layer(layer)
        index = self._layer_index(layer)
        variables: dict = {}
        for path in _layer_datasets(group):
            ds = group[path]
            scale, dims = ds.is_scale, _dim_names(ds, path.replace("/", "_"))
            del ds  # no second handle while a read below refreshes the dataset (HDF5 refuses it)
            if scale or path in (schema.HEAD_INDEX, schema.MODE_INDEX):
                continue
            sub, _, name = path.rpartition("/")
            if path == schema.STATS:
                variables["stats"] = (dims, self.stats(index))
            elif sub == schema.SNAPSHOT:
                variables[name] = (dims[1:], self.snapshot(index, name))
            elif sub == schema.SERIES:
                variables[f"series_{name}"] = (dims, self.series(index, name))
            elif sub == schema.BASES:
                variables[f"bases_{name}"] = (dims, group[path][()])
        used = {d for dims, _ in variables.values() for d in dims}
        coords: dict = {}
        for dim in used:
            if dim == schema.DIM_SAMPLE:
                coords[dim] = np.arange(self._rows)
                coords["id"] = (dim, np.asarray(self.ids, dtype=object))
                coords["step"] = (dim, self.steps)
                labels = self.labels
                if labels is not None:
                    coords["label"] = (dim, np.asarray(labels, dtype=object))
            elif dim == schema.DIM_POINT:
                coords[dim] = np.arange(len(self.series_steps))
                coords["series_step"] = (dim, self.series_steps)
            elif dim in group and group[dim].is_scale:
                values = group[dim][()]
                coords[dim] = np.array([schema.to_python(v) for v in values], dtype=object) \
                    if values.dtype.kind in "OS" else values
        return xr.Dataset(variables, coords=coords, attrs=self.layer_attrs(index))

    def _layer(self, layer: LayerKey) -> h5py.Group:
        return self._layers[self._layer_index(layer)]

    def _layer_index(self, layer: LayerKey) -> int:
        if isinstance(layer, str):
            if layer not in self.layer_names:
                raise RunFileError(f"{self.path} has no layer {layer!r}; its layers are {self.layer_names}.")
            return self.layer_names.index(layer)
        index = int(layer)
        if not -len(self._layers) <= index < len(self._layers):
            raise RunFileError(f"{self.path} has {len(self._layers)} layers, there is no layer {index}.")
        return index % len(self._layers)

    def _stat_index(self, stat: Union[str, int]) -> int:
        if isinstance(stat, str):
            if stat not in self.stat_names:
                raise RunFileError(f"{self.path} has no statistic {stat!r}; it has {self.stat_names}.")
            return self.stat_names.index(stat)
        return int(stat)

    # ---- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the file; safe to call twice."""
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> "RunFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _repr_html_(self) -> str:
        """Notebooks: a compact table of the file, its model and per layer the mode cosines."""
        from ..report.viewer import run_summary_html
        return run_summary_html(self)

    def __repr__(self) -> str:
        return (f"RunFile({str(self.path)!r}, rows={self._rows}, layers={len(self._layers)}, "
                f"stats={self.stat_names})")


def _layer_datasets(group: h5py.Group) -> list:
    """Paths inside a layer group of all its datasets, subgroups included (no handles kept)."""
    out: list = []
    group.visititems(lambda path, obj: out.append(path) if isinstance(obj, h5py.Dataset) else None)
    return out


def _dim_names(ds: h5py.Dataset, var: str) -> tuple:
    """Names of the coordinate scales attached to each axis (``<var>_dim<i>`` where none is)."""
    return tuple(ds.dims[a][0].name.rsplit("/", 1)[-1] if len(ds.dims[a]) else f"{var}_dim{a}"
                 for a in range(ds.ndim))


def _open(path: Path) -> h5py.File:
    # Checked before HDF5 sees it (truncation, links, external storage, shapes): see validate.py.
    return validate.open_run_file(path)


def _open_failure(path: Path, text: str) -> str:
    lowered = text.lower()
    if any(text in lowered for text in ("already open for write", "consistency flags",
                                        "not already open for swmr writing")):
        return (f"{path} was left open for writing by a writer that stopped; run `qkprobe recover {path}` "
                f"(once no writer is running) and open it again.")
    if "lock" in lowered:
        return f"{path} is locked by another program that is writing it; try again when it has finished."
    if "signature" in lowered:
        return f"{path} is not an HDF5 file; check the path."
    return f"{path} cannot be opened ({text.splitlines()[0]}); check that it is a complete qkprobe run file."

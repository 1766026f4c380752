"""Run files are labelled netCDF-4 for the ecosystem: xarray opens each layer group (h5netcdf engine)
with named dimensions and coordinate scales, and ``open_run(...).to_xarray(layer)`` gives the
committed data as a labelled Dataset. The growing scales follow appends, resume and recover."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch

xr = pytest.importorskip("xarray")
pytest.importorskip("h5netcdf")

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

import qkprobe  # noqa: E402
from qkprobe.sinks import schema  # noqa: E402
from qkprobe.sinks.hdf5_writer import RunWriter  # noqa: E402
from qkprobe.sinks.recover import truncate_rows  # noqa: E402
from qkprobe.sinks.run_file import open_run  # noqa: E402
from sink_rows import DIMS, STAT_NAMES, batch, layer_specs, row_values  # noqa: E402


def open_group(path, group):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # h5netcdf's phony_dims default notice
        ds = xr.open_dataset(path, engine="h5netcdf", group=group, phony_dims="access")
        return ds.load() if ds is not None else ds


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("xr") / "run.h5"
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32).eval()
    with qkprobe.attach(model, out=str(path), heads=[0, 2], stats="all") as probe:
        for step in range(2):
            probe.set_ids([f"img{step}_{j}" for j in range(3)])
            model(torch.randn(3, 3, 32, 32))
    return path


def test_xarray_opens_every_layer_group_labelled(probe_run):
    with open_run(probe_run) as run:  # before xarray holds the file (HDF5: one SWMR mode per process)
        q_max = [run.stats(i, "q_max") for i in range(2)]
    for i, key in enumerate(("layers/00", "layers/01")):
        ds = open_group(probe_run, key)
        stats = ds["stats"]
        assert stats.dims == ("sample", "head", "mode", "statistic")
        assert ds["head"].values.tolist() == [0, 2]  # the model's indices of the recorded heads
        assert ds["mode"].values.tolist() == list(range(64))
        assert list(ds["statistic"].values) == list(qkprobe.core.stats.STAT_NAMES)
        assert ds.sizes["sample"] == 6 and ds["sample"].values.tolist() == list(range(6))
        assert not any(d.startswith("phony") for d in ds.dims), ds.dims
        np.testing.assert_array_equal(stats.sel(statistic="q_max").values, q_max[i])
        ds.close()
    # subgroups open too, their arrays labelled with the layer's dimensions
    snap = open_group(probe_run, "layers/01/snapshot")
    assert snap["agg_mean"].dims == ("slot", "head", "mode", "statistic")
    assert snap["topk_scores"].dims == ("slot", "head", "mode", "sign", "top")
    bases = open_group(probe_run, "layers/01/bases")
    assert bases["U"].dims == ("model_head", "feature", "mode") and bases.sizes["model_head"] == 3
    series = open_group(probe_run, "layers/01/series")
    assert series["S"].dims == ("point", "model_head", "mode")
    for ds in (snap, bases, series):
        ds.close()


def test_to_xarray_is_the_committed_layer(probe_run):
    with open_run(probe_run) as run:
        ds = run.to_xarray("blocks.1.attn")
        assert ds["stats"].dims == ("sample", "head", "mode", "statistic")
        np.testing.assert_array_equal(ds["stats"].values, run.stats(1))
        assert ds["id"].values.tolist() == run.ids
        assert ds["head"].values.tolist() == [0, 2]
        np.testing.assert_array_equal(ds["agg_mean"].values, run.snapshot(1, "agg_mean"))
        assert ds["agg_mean"].dims == ("head", "mode", "statistic")
        np.testing.assert_array_equal(ds["bases_S"].values, run.bases(1)["S"])
        assert ds["series_S"].dims == ("point", "model_head", "mode")
        assert ds.attrs["name"] == "blocks.1.attn"
        share = ds["stats"].sel(statistic="attn_share").sum("mode")
        np.testing.assert_allclose(share.values, 1.0, rtol=1e-4)


def test_scales_grow_with_rows_resume_and_recover(tmp_path):
    path = tmp_path / "run.h5"
    with RunWriter(path, layer_specs(), STAT_NAMES, {}) as writer:
        writer.write(**batch(0, 4, 0))
        reader = open_run(path)   # a live SWMR reader in this process
        writer.commit(wait=True)
        reader.refresh()
        live = reader.to_xarray(1)
        assert live.sizes["sample"] == 4 and live["stats"].shape == (4, *DIMS[1], len(STAT_NAMES))
        writer.write(**batch(4, 3, 1))
        writer.commit(wait=True)
        reader.refresh()
        assert reader.to_xarray(0).sizes["sample"] == 7
        reader.close()
    with RunWriter(path, layer_specs(), STAT_NAMES, {}, resume=True) as writer:
        writer.write(**batch(7, 5, 2))
    ds = open_group(path, "layers/01")
    assert ds.sizes["sample"] == 12 and ds["sample"].values.tolist() == list(range(12))
    np.testing.assert_array_equal(ds["stats"].values, row_values(0, 12, 1))
    assert ds["stats"].dims == ("sample", "head", "mode", "statistic")
    ds.close()
    with h5py.File(path, "r+", libver=schema.LIBVER) as f:   # as recover does after a crash
        truncate_rows(f, 9, 0)
        assert all(f[f"layers/{k}/sample"].shape == (9,) for k in ("00", "01"))
    ds = open_group(path, "layers/00")
    assert ds.sizes["sample"] == 9 and ds["stats"].shape[0] == 9
    ds.close()


def _unlabelled(path):
    """Datasets of the layer groups with an axis that has no coordinate scale."""
    out = []
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and not obj.is_scale and obj.ndim:
                if any(len(obj.dims[a]) != 1 for a in range(obj.ndim)):
                    out.append(name)
        f[schema.LAYERS].visititems(visit)
    return out


def test_every_dataset_of_a_layer_group_is_labelled(probe_run, tmp_path):
    assert _unlabelled(probe_run) == []
    path = tmp_path / "run.h5"   # snapshot arrays declared by another caller ("count", "topk") too
    with RunWriter(path, layer_specs(), STAT_NAMES, {}) as writer:
        writer.write(**batch(0, 2, 0))
    assert _unlabelled(path) == []
    snap = open_group(path, "layers/00/snapshot")
    assert snap["topk"].dims[0] == "slot" and snap["count"].dims == ("slot", "snapshot_count_dim1")
    snap.close()

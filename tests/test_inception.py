"""The FID Inception: weights in pytorch-fid's layout, parity with pytorch-fid, the .pth reader."""

import io
import pickle
import sys

import numpy as np
import pytest
from flax import traverse_util

from faceage_jax.metrics import convert_inception, inception, torch_weights
from tests.helpers import REPO_ROOT

REFERENCE = REPO_ROOT / "tests" / "reference"
sys.path.insert(0, str(REFERENCE))
import seeded  # noqa: E402


def pytorch_layout_shapes():
    """pytorch-fid's keys and shapes, as this project's network needs them."""
    zeros = {
        path: np.zeros(leaf.shape, leaf.dtype)
        for path, leaf in traverse_util.flatten_dict(inception.expected_variables()).items()
    }
    shapes = {
        key: value.shape
        for key, value in inception.state_dict_from_variables(
            traverse_util.unflatten_dict(zeros)
        ).items()
    }
    return shapes | {"fc.weight": (1008, 2048), "fc.bias": (1008,)}


def seeded_state_dict():
    shapes = pytorch_layout_shapes()
    # pytorch-fid's file also counts BN batches; drawn the same on both sides.
    for key in list(shapes):
        if key.endswith("bn.running_var"):
            shapes[key.replace("running_var", "num_batches_tracked")] = ()
    return seeded.state_dict(shapes)


def test_the_network_has_every_key_of_pytorch_fids_file_and_no_other():
    with np.load(REFERENCE / "inception_features.npz") as reference:
        theirs = set(reference["state_dict_keys"].tolist())
    assert set(seeded_state_dict()) == theirs


@pytest.mark.slow
def test_features_equal_pytorch_fids_on_the_same_random_weights(tmp_path):
    variables = inception.variables_from_state_dict(seeded_state_dict())
    features = inception.features(variables, seeded.images(), batch_size=2)
    with np.load(REFERENCE / "inception_features.npz") as reference:
        expected = reference["features"]
    assert features.shape == expected.shape == (len(seeded.images()), inception.FEATURES)
    # Each porting mistake tried (padding counted in a pool, 7c's max pool as an
    # average, align_corners, a transposed kernel) moves them by 1-20 %.
    relative = np.linalg.norm(features - expected) / np.linalg.norm(expected)
    assert relative < 1e-5, relative


def test_npz_and_state_dict_round_trip(tmp_path):
    state_dict = seeded_state_dict()
    variables = inception.variables_from_state_dict(state_dict)
    again = inception.state_dict_from_variables(variables)
    for key, value in again.items():
        np.testing.assert_array_equal(value, state_dict[key], err_msg=key)
    path = tmp_path / "inception.npz"
    torch_weights.save_npz(again, path)
    loaded = inception.load_variables(path)
    leaves = traverse_util.flatten_dict(loaded)
    for name, value in traverse_util.flatten_dict(variables).items():
        np.testing.assert_array_equal(leaves[name], value)


def test_a_missing_key_an_extra_key_or_a_wrong_shape_is_a_clear_error():
    state_dict = seeded_state_dict()
    missing = dict(state_dict)
    del missing["Mixed_6b.branch7x7_2.conv.weight"]
    with pytest.raises(inception.WeightsError, match=r"1 keys missing .*Mixed_6b"):
        inception.variables_from_state_dict(missing)
    extra = state_dict | {"AuxLogits.conv0.conv.weight": np.zeros((128, 768, 1, 1))}
    with pytest.raises(inception.WeightsError, match=r"1 unknown keys .*AuxLogits"):
        inception.variables_from_state_dict(extra)
    wrong = state_dict | {"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 5, 5), np.float32)}
    with pytest.raises(inception.WeightsError, match=r"Conv2d_1a_3x3.conv.weight has shape"):
        inception.variables_from_state_dict(wrong)


def test_missing_weights_file_says_what_to_get(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        inception.load_variables(tmp_path / "nothing.pth")


@pytest.mark.parametrize("name", ["small_zip.pth", "small_legacy.pth"])
def test_reader_loads_both_torch_save_formats(name):
    state_dict = torch_weights.load_state_dict(REFERENCE / name)
    with np.load(REFERENCE / "small_expected.npz") as expected:
        assert sorted(state_dict) == sorted(expected.files)
        for key in expected.files:
            assert state_dict[key].dtype == expected[key].dtype, key
            np.testing.assert_array_equal(state_dict[key], expected[key], err_msg=key)


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("echo this must never run",))


def test_reader_refuses_a_pickle_that_names_any_other_global(tmp_path):
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"weight": _RunsCode()}))
    with pytest.raises(torch_weights.UnsafeWeightsError, match="refusing to load"):
        torch_weights.load_state_dict(path)
    # The same inside a zip-format archive.
    import zipfile

    archive = tmp_path / "evil_zip.pth"
    with zipfile.ZipFile(archive, "w") as file:
        file.writestr("archive/data.pkl", pickle.dumps({"weight": _RunsCode()}))
    with pytest.raises(torch_weights.UnsafeWeightsError, match="refusing to load"):
        torch_weights.load_state_dict(archive)


def test_a_file_that_is_not_a_torch_save_file_is_a_clear_error(tmp_path):
    path = tmp_path / "truncated.pth"
    path.write_bytes((REFERENCE / "small_legacy.pth").read_bytes()[:200])
    with pytest.raises(pickle.UnpicklingError, match="could not be read"):
        torch_weights.load_state_dict(path)


def test_converter_writes_an_npz_that_loads_to_the_same_variables(tmp_path, capsys):
    # The .pth side of the converter is the reader's, tested above on real files.
    source, target = tmp_path / "weights.npz", tmp_path / "converted.npz"
    torch_weights.save_npz(seeded_state_dict(), source)
    convert_inception.main([str(source), str(target)])
    assert "Wrote 470 arrays" in capsys.readouterr().out
    with np.load(target) as converted:
        assert "fc.weight" not in converted.files
    expected = traverse_util.flatten_dict(inception.load_variables(source))
    for name, value in traverse_util.flatten_dict(inception.load_variables(target)).items():
        np.testing.assert_array_equal(value, expected[name])


def crafted_zip_pth(path, size, stride, offset=0, numel=6):
    """A zip-format .pth whose one tensor has the given layout, pickled as torch would."""
    import types
    import zipfile

    torch_module, utils_module = types.ModuleType("torch"), types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while pickling")

    FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    torch_module.FloatStorage, utils_module._rebuild_tensor_v2 = FloatStorage, _rebuild_tensor_v2
    torch_module._utils = utils_module

    class Storage:
        pass

    class Tensor:
        def __reduce__(self):
            return (_rebuild_tensor_v2, (Storage(), offset, size, stride, False, {}))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return ("storage", FloatStorage, "0", "cpu", numel)
            return None

    saved = {name: sys.modules.get(name) for name in ["torch", "torch._utils"]}
    sys.modules.update({"torch": torch_module, "torch._utils": utils_module})
    try:
        buffer = io.BytesIO()
        Pickler(buffer, protocol=2).dump({"weight": Tensor()})
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name)
            else:
                sys.modules[name] = module
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/data/0", np.arange(numel, dtype=np.float32).tobytes())
    return path


def test_reader_refuses_a_tensor_that_would_read_past_its_storage(tmp_path):
    fine = crafted_zip_pth(tmp_path / "fine.pth", size=(2, 2), stride=(1, 2), offset=2)
    np.testing.assert_array_equal(
        torch_weights.load_state_dict(fine)["weight"], [[2.0, 4.0], [3.0, 5.0]]
    )
    overrun = crafted_zip_pth(tmp_path / "overrun.pth", size=(1000,), stride=(1,))
    with pytest.raises(pickle.UnpicklingError, match="overruns its storage"):
        torch_weights.load_state_dict(overrun)
    negative = crafted_zip_pth(tmp_path / "negative.pth", size=(2,), stride=(-1,), offset=3)
    with pytest.raises(pickle.UnpicklingError, match="bad tensor layout"):
        torch_weights.load_state_dict(negative)

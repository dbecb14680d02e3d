"""Model specs: timm, torchvision, py: factories, TorchScript files; weights files; normalisation."""

from __future__ import annotations

import hashlib

import pytest
import torch

from conftest import NUM_CLASSES, TEACHER
from kdcache.errors import KdcacheError
from kdcache.models.factory import IMAGENET_MEAN, IMAGENET_STD, create_model, load_state_dict, normalize
from kdcache.models.zoo import tiny_cnn

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


def _same_params(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def ref_model():
    torch.manual_seed(123)
    return tiny_cnn(NUM_CLASSES).eval()


def test_timm_spec_uses_its_pretrained_cfg():
    info = create_model("timm:test_resnet", num_classes=NUM_CLASSES, resolution=64)
    assert info.num_classes == NUM_CLASSES
    assert info.mean == (0.5, 0.5, 0.5) and info.mean != IMAGENET_MEAN  # from timm's pretrained_cfg
    with torch.no_grad():
        assert info.model.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, NUM_CLASSES)
    # override wins
    info = create_model("timm:test_resnet", num_classes=3, resolution=64, mean=(0.1, 0.2, 0.3), std=(1, 2, 3))
    assert info.mean == (0.1, 0.2, 0.3) and info.std == (1.0, 2.0, 3.0) and info.num_classes == 3


def test_torchvision_spec_defaults_to_imagenet_normalisation():
    info = create_model("torchvision:squeezenet1_1", num_classes=NUM_CLASSES, resolution=64)
    assert info.num_classes == NUM_CLASSES
    assert (info.mean, info.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert info.describe()["spec"] == "torchvision:squeezenet1_1"


def test_py_factory_gets_num_classes():
    info = create_model(TEACHER, num_classes=9, resolution=32)
    assert info.num_classes == 9 and info.model.head.out_features == 9
    assert (info.mean, info.std) == (IMAGENET_MEAN, IMAGENET_STD)
    # a factory without a num_classes parameter is called without it, and its width is measured
    info = create_model("py:testmodels:fixed_cnn", resolution=32)
    assert info.num_classes == 7


def test_torchscript_file(tmp_path, ref_model):
    path = tmp_path / "teacher.ts"
    torch.jit.save(torch.jit.script(ref_model), str(path))
    info = create_model(str(path), num_classes=NUM_CLASSES, resolution=32)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(info.model.eval()(x), ref_model(x), atol=1e-6)
    assert info.num_classes == NUM_CLASSES
    # a TorchScript file also takes a weights file
    torch.manual_seed(7)
    other = tiny_cnn(NUM_CLASSES)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    info = create_model(str(path), weights=str(tmp_path / "other.pt"), resolution=32)
    assert _same_params(info.model, other)


def test_exported_program_file(tmp_path, ref_model):
    path = tmp_path / "teacher.pt2"
    ref_model.eval()
    batch = {"x": {0: torch.export.Dim("batch", min=1)}}
    program = torch.export.export(ref_model, (torch.rand(2, 3, 32, 32),), dynamic_shapes=batch)
    torch.export.save(program, str(path))
    info = create_model(str(path), num_classes=NUM_CLASSES, resolution=32)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(info.model(x), ref_model(x), atol=1e-6)
    assert info.num_classes == NUM_CLASSES
    fixed = tmp_path / "fixed.pt2"  # exported with a fixed batch size: refused with advice
    torch.export.save(torch.export.export(ref_model, (torch.rand(2, 3, 32, 32),)), str(fixed))
    with pytest.raises(KdcacheError, match=r"fixed\.pt2.*dynamic batch"):
        create_model(str(fixed), resolution=32)
    (tmp_path / "junk.pt2").write_bytes(b"not a program")
    with pytest.raises(KdcacheError, match=r"junk\.pt2.*torch\.export"):
        create_model(str(tmp_path / "junk.pt2"), resolution=32)


@pytest.mark.parametrize("kind", ["pt", "pth-wrapped", "safetensors"])
def test_weights_files(tmp_path, ref_model, kind):
    state = ref_model.state_dict()
    if kind == "pt":
        path = tmp_path / "w.pt"
        torch.save(state, path)
    elif kind == "pth-wrapped":  # a training checkpoint of a DDP model
        path = tmp_path / "w.pth"
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    info = create_model(TEACHER, num_classes=NUM_CLASSES, weights=str(path), resolution=32)
    assert _same_params(info.model, ref_model)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(info.model.eval()(x), ref_model(x))
    d = info.describe()
    assert d["weights"] == path.name
    assert d["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert d["num_classes"] == NUM_CLASSES and d["mean"] == list(IMAGENET_MEAN)


def test_weights_errors(tmp_path, ref_model):
    with pytest.raises(KdcacheError, match=r"weights file .*missing\.pt does not exist"):
        create_model(TEACHER, num_classes=NUM_CLASSES, weights=str(tmp_path / "missing.pt"))
    with pytest.raises(KdcacheError, match=r"weights file .*missing\.pt does not exist"):
        load_state_dict(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"definitely not a torch file")
    with pytest.raises(KdcacheError, match=r"weights file .*junk\.pt is not a PyTorch state dict or checkpoint"):
        create_model(TEACHER, num_classes=NUM_CLASSES, weights=str(tmp_path / "junk.pt"))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(KdcacheError, match="holds a list, not a state dict"):
        create_model(TEACHER, num_classes=NUM_CLASSES, weights=str(tmp_path / "list.pt"))
    # weights of another architecture
    torch.save(torch.nn.Linear(3, 4).state_dict(), tmp_path / "linear.pt")
    with pytest.raises(KdcacheError, match=r"linear\.pt does not fit the model: missing keys"):
        create_model(TEACHER, num_classes=NUM_CLASSES, weights=str(tmp_path / "linear.pt"))
    # weights for another class count: the head's shape differs
    torch.save(tiny_cnn(10).state_dict(), tmp_path / "ten.pt")
    with pytest.raises(KdcacheError, match=r"ten\.pt does not fit the model.*--num-classes"):
        create_model(TEACHER, num_classes=NUM_CLASSES, weights=str(tmp_path / "ten.pt"))


def test_class_count_mismatch(tmp_path):
    with pytest.raises(KdcacheError, match=r"outputs 7 classes but 5 were asked for"):
        create_model("py:testmodels:fixed_cnn", num_classes=5, resolution=32)
    path = tmp_path / "ten.ts"
    torch.jit.save(torch.jit.script(tiny_cnn(10)), str(path))
    with pytest.raises(KdcacheError, match=r"outputs 10 classes but 5 were asked for"):
        create_model(str(path), num_classes=5, resolution=32)


@pytest.mark.parametrize(
    "spec,pattern",
    [
        ("resnet50", "unknown model spec 'resnet50'"),
        ("timm:no_such_net_xyz", "unknown timm model 'no_such_net_xyz'"),
        ("torchvision:no_such_net", "unknown torchvision classification model 'no_such_net'"),
        ("py:kdcache.models.zoo", "expected py:MODULE:FACTORY"),
        ("py:no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("py:kdcache.models.zoo:nope", "has no callable 'nope'"),
        ("py:testmodels:not_a_module", "returned str, not a torch nn.Module"),
    ],
)
def test_bad_specs(spec, pattern):
    with pytest.raises(KdcacheError, match=pattern):
        create_model(spec, num_classes=NUM_CLASSES, resolution=32)


def test_a_state_dict_is_not_a_model_spec(tmp_path, ref_model):
    torch.save(ref_model.state_dict(), tmp_path / "w.pt")
    with pytest.raises(KdcacheError, match="not a TorchScript model"):
        create_model(str(tmp_path / "w.pt"), num_classes=NUM_CLASSES)


def test_mean_std_validation_and_normalize():
    with pytest.raises(KdcacheError, match="three values each"):
        create_model(TEACHER, num_classes=NUM_CLASSES, resolution=32, mean=(0.5, 0.5))
    x = torch.full((1, 3, 2, 2), 0.5)
    y = normalize(x, (0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([0.0, 1.0, 0.5]))


def test_unknown_timm_name_suggests_close_names():
    with pytest.raises(KdcacheError, match=r"unknown timm model 'convnext_tinyy'.*similar names: \['convnext_tiny'"):
        create_model("timm:convnext_tinyy", resolution=32)


def test_a_spec_recorded_before_the_zoo_moved_still_names_the_same_factory():
    # Caches and runs made before the package layout changed recorded py:kdcache.zoo:...; they must
    # keep resolving to the same network (verify and live training rebuild the teacher from it).
    torch.manual_seed(0)
    old = create_model("py:kdcache.zoo:tiny_cnn", num_classes=7).model
    torch.manual_seed(0)
    new = create_model("py:kdcache.models.zoo:tiny_cnn", num_classes=7).model
    assert type(old) is type(new)
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))

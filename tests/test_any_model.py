"""Any CNN a user brings: timm models by name and a module of their own go init → prune → save →
load → ONNX export; what Torch-Pruning cannot handle is refused at init naming the layer;
the weights users have (state dicts, safetensors, training checkpoints, another zoo's classifier)
load or are refused naming the keys; a torchvision-style resize + centre crop is recorded in
model.json and used when images are decoded."""
from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from prune_core.architectures import build_model
from prune_core.checkpoint import WeightsError, fit_state_dict, load_weights, read_state_dict
from prune_core.cli import run
from prune_core.data import Interpolation, Preprocess, decode_image, load_image_folder
from prune_core.measure import count_params
from prune_core.model_format import MODEL_JSON, ModelFormatError, load_model, read_card

PIPELINE = [
    ("timm:resnet18", {}),
    ("timm:mobilenetv3_large_100", {}),
    ("timm:efficientnet_b0", {}),
    ("timm:regnetx_002", {}),
    ("timm:convnext_atto", {}),
    ("custom_models:build", {"width": 24}),
]


def cli(capsys, *argv) -> dict:
    """Run an `edgetune` command in this process; its JSON output."""
    rc = run([str(a) for a in argv])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads(captured.out)


def cli_error(capsys, *argv) -> str:
    """Run an `edgetune` command that must fail; its one-line error."""
    rc = run([str(a) for a in argv])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert captured.err.count("\n") == 1, captured.err
    return captured.err


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """ImageFolder of 12 MNIST digits in each of 4 classes."""
    import importlib.util

    # tests/conftest.py by path: under xdist another conftest (tests/daemon/) may own the name
    spec = importlib.util.spec_from_file_location("top_conftest", Path(__file__).parent / "conftest.py")
    top = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(top)
    write_mnist_folder = top.write_mnist_folder

    return write_mnist_folder(tmp_path_factory.mktemp("digits") / "images", [0, 1, 2, 3], 12)


# ---------------------------------------------------------------------------
# init → prune → save → load → export
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("arch, kwargs", PIPELINE, ids=[a for a, _ in PIPELINE])
def test_init_prune_load_export(arch, kwargs, digits, tmp_path, capsys):
    base, out = tmp_path / "base", tmp_path / "pruned"
    init = cli(capsys, "init", base, "--arch", arch, "--arch-kwargs", json.dumps(kwargs), "--classes-from", digits, "--image-size", "32")
    assert init["arch"] == arch and init["arch_kwargs"] == kwargs and init["num_classes"] == 4
    assert 0.1 < init["trial_prune_level"] < 0.6

    model, card = load_model(base)
    assert (card.arch, card.arch_kwargs, card.input_size) == (arch, kwargs, 32)
    assert count_params(model) == init["params"]

    summary = cli(capsys, "prune", base, "--data", digits, "--level", "0.3", "--epochs", "0", "--quiet", "--out", out)
    assert abs(summary["level_achieved"] - 0.3) <= 0.03
    pruned, pruned_card = load_model(out)
    assert count_params(pruned) == summary["params_after"] < init["params"]
    assert (pruned_card.arch, pruned_card.arch_kwargs) == (arch, kwargs)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert pruned(x).shape == (2, 4)

    exported = cli(capsys, "export", out, "--onnx", tmp_path / "model.onnx")
    assert exported["max_abs_diff_vs_torch"] <= 1e-4
    assert (tmp_path / "model.onnx").stat().st_size > 0


def test_factory_kwargs_are_used_on_load(tmp_path, capsys):
    cli(capsys, "init", tmp_path / "m", "--arch", "custom_models:build", "--arch-kwargs", '{"width": 8}', "--num-classes", "3", "--image-size", "16")
    assert json.loads((tmp_path / "m" / MODEL_JSON).read_text())["arch_kwargs"] == {"width": 8}
    model, _ = load_model(tmp_path / "m")
    assert model.stem[0].out_channels == 8 and model.head.in_features == 32


# ---------------------------------------------------------------------------
# refused at init, naming the layer
# ---------------------------------------------------------------------------

def test_a_module_torch_pruning_cannot_handle_is_refused_naming_the_layer(tmp_path, capsys):
    err = cli_error(capsys, "init", tmp_path / "m", "--arch", "custom_models:build_unprunable", "--num-classes", "3", "--image-size", "16")
    assert "cannot be pruned" in err and "layer 'scale'" in err
    assert not (tmp_path / "m" / MODEL_JSON).exists()


def test_an_input_too_small_for_the_network_is_refused_naming_the_layer(tmp_path, capsys):
    err = cli_error(capsys, "init", tmp_path / "m", "--arch", "timm:convnext_atto", "--num-classes", "3", "--image-size", "16")
    assert "does not run at input size 16" in err and "layer 'stages." in err


@pytest.mark.parametrize(
    "arch, kwargs, fragments",
    [
        ("timm:resnet1800", "{}", ["timm has no model 'resnet1800'", "resnet18"]),
        ("timm:resnet18", '{"pretrained": true}', ["may not set pretrained"]),
        ("resnet18", '{"width": 2}', ["takes no arch kwargs"]),
        ("no_such_package.models:build", "{}", ["cannot import no_such_package.models"]),
        ("custom_models:missing", "{}", ["has no 'missing'"]),
        ("custom_models:not_a_module", "{}", ["returned str, not a torch nn.Module"]),
        ("custom_models:build", '{"depth": 3}', ["unexpected keyword argument 'depth'"]),
    ],
)
def test_architectures_that_cannot_be_built(tmp_path, capsys, arch, kwargs, fragments):
    err = cli_error(capsys, "init", tmp_path / "m", "--arch", arch, "--arch-kwargs", kwargs, "--num-classes", "3", "--image-size", "32")
    for fragment in fragments:
        assert fragment in err


def test_arch_kwargs_must_be_a_json_object(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(["init", str(tmp_path / "m"), "--arch", "custom_models:build", "--arch-kwargs", "[1, 2]", "--num-classes", "3"])
    assert "--arch-kwargs" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# weights users have
# ---------------------------------------------------------------------------

def _trained(arch: str, classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(arch, classes)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.detach(), b.detach())


@pytest.mark.parametrize("kind", ["torch", "safetensors"])
def test_a_state_dict_loads_at_init(tmp_path, capsys, kind):
    source = _trained("timm:resnet18", 4, seed=1)
    path = tmp_path / ("w.pt" if kind == "torch" else "w.safetensors")
    if kind == "torch":
        torch.save(source.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    init = cli(capsys, "init", tmp_path / "m", "--arch", "timm:resnet18", "--num-classes", "4", "--image-size", "32", "--weights", path)
    assert init["weights"]["tensors_loaded"] == len(source.state_dict())
    model, _ = load_model(tmp_path / "m")
    for key, value in source.state_dict().items():
        assert _same(model.state_dict()[key], value), key


def test_a_torchvision_checkpoint_with_another_class_count(tmp_path, capsys):
    """ImageNet-shaped torchvision resnet18 weights into timm:resnet18 with 4 classes: all but the classifier load, and init says so."""
    import torchvision

    torch.manual_seed(2)
    source = torchvision.models.resnet18(weights=None, num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    init = cli(capsys, "init", tmp_path / "m", "--arch", "timm:resnet18", "--num-classes", "4", "--image-size", "32",
               "--weights", tmp_path / "resnet18.pth")
    assert init["weights"]["untrained"] == ["fc"]
    assert "1000 classes" in init["weights"]["notes"][0]
    model, _ = load_model(tmp_path / "m")
    assert _same(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert _same(model.bn1.running_var, source.bn1.running_var)
    assert model.fc.weight.shape == (4, 512)


def test_a_classifier_named_differently_is_mapped():
    """A fine-tuned network whose `fc` became Sequential(Dropout, Linear) saves `fc.1.*` (and
    torch before 0.4.1 saved no `num_batches_tracked`)."""
    source = _trained("timm:resnet18", 4, seed=3)
    state = {k.replace("fc.", "fc.1."): v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    model = _trained("timm:resnet18", 4, seed=4)
    fit = fit_state_dict(model, state)
    assert fit.renamed == {"fc.1": "fc"} and not fit.untrained
    assert _same(model.fc.weight, source.fc.weight) and _same(model.conv1.weight, source.conv1.weight)


def test_a_training_checkpoint_is_unwrapped(tmp_path):
    """timm's train.py saves {'epoch', 'arch', 'state_dict', 'args': Namespace, ...}; DataParallel adds 'module.'."""
    source = _trained("custom_models:build", 3, seed=5)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"epoch": 7, "arch": "custom", "state_dict": state, "args": argparse.Namespace(lr=0.1), "metric": 0.5}, tmp_path / "ckpt.pth.tar")
    model = _trained("custom_models:build", 3, seed=6)
    load_weights(model, tmp_path / "ckpt.pth.tar")
    assert _same(model.head.weight, source.head.weight) and _same(model.stem[1].running_mean, source.stem[1].running_mean)


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(_Payload.target),))


def test_a_pickled_object_is_never_unpickled(tmp_path):
    _Payload.target = str(tmp_path / "pwned")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="does not unpickle"):
        read_state_dict(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_keys_that_do_not_match_are_named(tmp_path, capsys):
    import torchvision

    torch.save(torchvision.models.efficientnet_b0(weights=None, num_classes=4).state_dict(), tmp_path / "tv.pth")
    err = cli_error(capsys, "init", tmp_path / "m", "--arch", "timm:efficientnet_b0", "--num-classes", "4", "--image-size", "32",
                    "--weights", tmp_path / "tv.pth")
    assert "does not fit the model" in err and "missing from the file: blocks.0.0.bn1.bias" in err
    assert "not in the model: classifier.1.bias" in err and "another architecture's weights?" in err
    assert "timm:efficientnet_b0 with 4 classes" in err


def test_a_file_that_is_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="does not hold a state dict"):
        read_state_dict(tmp_path / "list.pt")
    torch.save({"epoch": 3, "lr": torch.tensor(0.1)}, tmp_path / "mixed.pt")
    with pytest.raises(WeightsError, match="not tensors .*epoch"):
        read_state_dict(tmp_path / "mixed.pt")


def test_a_classifier_with_other_inputs_is_not_taken_for_a_class_count_change():
    source = _trained("custom_models:build", 3, seed=7)
    state = dict(source.state_dict())
    state["head.weight"] = torch.zeros(3, 10)
    with pytest.raises(WeightsError, match="classifier 'head'"):
        fit_state_dict(_trained("custom_models:build", 3, seed=8), state)


# ---------------------------------------------------------------------------
# resize + centre crop
# ---------------------------------------------------------------------------

def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("width, height", [(300, 200), (200, 301), (256, 256)])
@pytest.mark.parametrize("interpolation", list(Interpolation))
def test_resize_and_crop_match_torchvision_presets(width, height, interpolation):
    from torchvision import transforms as T

    modes = {"nearest": T.InterpolationMode.NEAREST, "bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}
    img = _photo(width, height)
    want = T.CenterCrop(224)(T.Resize(256, interpolation=modes[interpolation.value])(img))
    got = Preprocess(224, 256, interpolation).apply(img)
    assert got.size == (224, 224)
    assert np.array_equal(np.asarray(got), np.asarray(want))


def test_a_resize_and_crop_policy_round_trips_through_model_json(tmp_path, capsys):
    init = cli(capsys, "init", tmp_path / "m", "--arch", "cifar_small", "--num-classes", "2", "--image-size", "224",
               "--resize-size", "256", "--interpolation", "bicubic")
    assert (init["input_size"], init["resize_size"], init["interpolation"]) == (224, 256, "bicubic")
    body = json.loads((tmp_path / "m" / MODEL_JSON).read_text())
    assert (body["input_size"], body["resize_size"], body["interpolation"]) == (224, 256, "bicubic")
    card = read_card(tmp_path / "m")
    assert card.preprocess == Preprocess(224, 256, Interpolation.BICUBIC)

    buffer = io.BytesIO()
    _photo(640, 480).save(buffer, format="JPEG")
    decoded = decode_image(buffer.getvalue(), card.preprocess)
    assert decoded.shape == (3, 224, 224) and decoded.dtype == torch.uint8
    expected = np.asarray(card.preprocess.apply(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    assert np.array_equal(decoded.permute(1, 2, 0).numpy(), expected)

    folder = tmp_path / "images" / "0"
    folder.mkdir(parents=True)
    _photo(320, 180).save(folder / "wide.png")
    assert load_image_folder(tmp_path / "images", card.class_names, card.preprocess).images.shape == (1, 3, 224, 224)


def test_an_old_card_scales_the_whole_image(tmp_path, capsys):
    cli(capsys, "init", tmp_path / "m", "--arch", "cifar_small", "--num-classes", "2")
    path = tmp_path / "m" / MODEL_JSON
    body = json.loads(path.read_text())
    for key in ("resize_size", "interpolation", "arch_kwargs"):
        del body[key]
    path.write_text(json.dumps(body))
    model, card = load_model(tmp_path / "m")
    assert card.preprocess == Preprocess(32) and card.arch_kwargs == {}
    buffer = io.BytesIO()
    _photo(64, 48).save(buffer, format="PNG")
    expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).resize((32, 32), Image.BILINEAR))
    assert np.array_equal(decode_image(buffer.getvalue(), card.preprocess).permute(1, 2, 0).numpy(), expected)
    assert torch.equal(decode_image(buffer.getvalue(), card.preprocess), decode_image(buffer.getvalue(), 32))


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"resize_size": 16}, "smaller than the crop size"),
        ({"interpolation": "lanczos"}, "missing or invalid field"),
        ({"arch": "timm:no_such_net"}, "timm has no model 'no_such_net'"),
        ({"arch": "my models:build"}, "not of the form package.module:factory"),
    ],
)
def test_invalid_preprocessing_or_architecture_in_model_json(tmp_path, capsys, edit, message):
    cli(capsys, "init", tmp_path / "m", "--arch", "cifar_small", "--num-classes", "2")
    path = tmp_path / "m" / MODEL_JSON
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(ModelFormatError, match=message):
        load_model(tmp_path / "m")


def test_a_resize_smaller_than_the_crop_is_refused_at_init(tmp_path, capsys):
    err = cli_error(capsys, "init", tmp_path / "m", "--arch", "cifar_small", "--num-classes", "2", "--image-size", "64", "--resize-size", "48")
    assert "resize size 48 is smaller than the crop size 64" in err

"""prune_core.model_format: a model directory (model.json + weights.safetensors) round-trips
exactly, pruned or not, and every kind of damage is a ModelFormatError naming the problem."""
from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from prune_core.architectures import build_model
from prune_core.measure import count_macs, count_params
from prune_core.model_format import (
    FORMAT,
    FORMAT_VERSION,
    MODEL_JSON,
    WEIGHTS,
    Lineage,
    ModelCard,
    ModelFormatError,
    channel_plan,
    load_model,
    read_card,
    save_model,
)

CLASSES = [f"c{i}" for i in range(10)]


def card(**kw) -> ModelCard:
    return ModelCard("cifar_small", 10, list(CLASSES), 32, **kw)


def probe_input(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k], sb[k]), k
    assert count_params(a) == count_params(b)
    a.eval(), b.eval()
    with torch.no_grad():
        x = probe_input()
        assert torch.equal(a(x), b(x))


@pytest.fixture(scope="module")
def _saved_template(tmp_path_factory, randomise_bn) -> Path:
    torch.manual_seed(0)
    model = randomise_bn(build_model("cifar_small", 10), seed=5)
    directory = tmp_path_factory.mktemp("saved") / "m"
    save_model(model, card(), directory)
    return directory


@pytest.fixture(scope="module")
def _saved_pruned_template(tmp_path_factory, _pruned_cifar_small) -> Path:
    _, outcome = _pruned_cifar_small
    lineage = Lineage(parent="/models/base", criterion="l1", level=0.5, allocation="uniform", finetune_before=0,
                      metrics={"top1_after": 0.75})
    directory = tmp_path_factory.mktemp("saved_pruned") / "p"
    save_model(outcome.model, card(lineage=lineage), directory)
    return directory


@pytest.fixture
def saved(tmp_path, _saved_template) -> Path:
    """A fresh copy of a saved (unpruned, BN-randomised) cifar_small model directory."""
    return Path(shutil.copytree(_saved_template, tmp_path / "m"))


@pytest.fixture
def saved_pruned(tmp_path, _saved_pruned_template, pruned_cifar_small) -> tuple[Path, torch.nn.Module]:
    """A fresh copy of a saved pruned cifar_small model directory, and the pruned model."""
    return Path(shutil.copytree(_saved_pruned_template, tmp_path / "p")), pruned_cifar_small[1].model


def edit_json(directory: Path, edit) -> None:
    path = directory / MODEL_JSON
    body = json.loads(path.read_text())
    edit(body)
    path.write_text(json.dumps(body))


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------

def test_roundtrip_unpruned(tmp_path, randomise_bn):
    torch.manual_seed(0)
    model = randomise_bn(build_model("cifar_small", 10), seed=1)
    saved_card = save_model(model, card(), tmp_path / "m")
    loaded, loaded_card = load_model(tmp_path / "m")
    assert not loaded.training
    assert_same_model(model, loaded)
    assert loaded_card.params == saved_card.params == count_params(model)
    assert loaded_card.macs == saved_card.macs == count_macs(model, 32)
    assert loaded_card.channel_plan == channel_plan(model)


def test_roundtrip_pruned(saved_pruned, pruned_cifar_small):
    directory, pruned = saved_pruned
    unpruned, outcome = pruned_cifar_small
    assert 0.4 < outcome.achieved_level < 0.6
    loaded, loaded_card = load_model(directory)
    assert_same_model(pruned, loaded)
    assert count_params(loaded) == outcome.params_after < count_params(unpruned)
    assert loaded_card.params == outcome.params_after
    assert loaded_card.macs == count_macs(pruned, 32) < count_macs(unpruned, 32)
    # the plan records the shrunken layers, and the loaded modules carry them
    assert loaded_card.channel_plan["layer1.0"]["out_channels"] < 64
    assert loaded.layer1[0].out_channels == pruned.layer1[0].out_channels
    assert loaded.fc.in_features == pruned.fc.in_features < 256
    # saving the loaded model again gives the same weights file
    save_model(loaded, loaded_card, directory.parent / "again")
    assert (directory.parent / "again" / WEIGHTS).read_bytes() == (directory / WEIGHTS).read_bytes()


def test_model_json_fields(saved_pruned):
    directory, pruned = saved_pruned
    body = json.loads((directory / MODEL_JSON).read_text())
    assert body["format"] == FORMAT and body["format_version"] == FORMAT_VERSION
    assert body["arch"] == "cifar_small"
    assert body["num_classes"] == 10 and body["class_names"] == CLASSES
    assert body["input_size"] == 32
    assert body["mean"] == pytest.approx([0.485, 0.456, 0.406]) and body["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert body["params"] == count_params(pruned)
    assert body["macs"] == count_macs(pruned, 32)
    assert body["weights_sha256"] == hashlib.sha256((directory / WEIGHTS).read_bytes()).hexdigest()
    plan = body["channel_plan"]
    conv = plan["layer2.1.conv1"]
    assert set(conv) >= {"in_channels", "out_channels", "groups"}
    assert conv["out_channels"] == pruned.layer2[1].conv1.out_channels
    assert plan["layer2.1.bn1"]["num_features"] == conv["out_channels"]
    assert plan["fc"] == {"in_features": pruned.fc.in_features, "out_features": 10}
    lineage = body["lineage"]
    assert lineage["parent"] == "/models/base" and lineage["criterion"] == "l1" and lineage["level"] == 0.5
    assert lineage["allocation"] == "uniform" and lineage["metrics"] == {"top1_after": 0.75}
    assert isinstance(lineage["created"], str) and lineage["created"]
    assert read_card(directory).lineage == Lineage(**lineage)


def test_save_leaves_no_temporary_files(saved):
    assert sorted(p.name for p in saved.iterdir()) == [MODEL_JSON, WEIGHTS]


def test_load_never_unpickles(saved_pruned, monkeypatch):
    directory, pruned = saved_pruned

    def forbidden(*args, **kwargs):
        raise AssertionError("model loading must not unpickle")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    loaded, _ = load_model(directory)
    assert_same_model(pruned, loaded)


# ---------------------------------------------------------------------------
# Damage
# ---------------------------------------------------------------------------

def test_corrupted_weights_fail_the_checksum(saved):
    weights = saved / WEIGHTS
    raw = bytearray(weights.read_bytes())
    for i in range(len(raw) - 64, len(raw) - 32):
        raw[i] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(ModelFormatError, match="checksum") as err:
        load_model(saved)
    assert str(weights) in str(err.value)


def test_truncated_weights_without_checksum_are_unreadable(saved):
    edit_json(saved, lambda body: body.pop("weights_sha256"))
    weights = saved / WEIGHTS
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ModelFormatError, match="unreadable"):
        load_model(saved)


def test_weights_truncated_to_a_few_bytes(saved):
    edit_json(saved, lambda body: body.update(weights_sha256=""))
    (saved / WEIGHTS).write_bytes(b"\x01\x02\x03")
    with pytest.raises(ModelFormatError, match="unreadable"):
        load_model(saved)


def test_missing_weights(saved):
    (saved / WEIGHTS).unlink()
    with pytest.raises(ModelFormatError, match="not found"):
        load_model(saved)


def test_missing_directory(tmp_path):
    with pytest.raises(ModelFormatError, match="not found"):
        load_model(tmp_path / "nowhere")


@pytest.mark.parametrize("text", ["{not json", "", "\x00\x01binary"])
def test_invalid_json(saved, text):
    (saved / MODEL_JSON).write_text(text)
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        read_card(saved)
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        load_model(saved)


@pytest.mark.parametrize("field", ["arch", "num_classes", "class_names", "input_size", "mean", "std"])
def test_missing_field(saved, field):
    edit_json(saved, lambda body: body.pop(field))
    with pytest.raises(ModelFormatError, match="missing or invalid field"):
        load_model(saved)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda b: b.update(arch="resnet9000"), "unknown architecture 'resnet9000'"),
        (lambda b: b.pop("format"), "not an edgetune model"),
        (lambda b: b.update(format_version=99), "unsupported format_version 99"),
        (lambda b: b.update(class_names=["a", "b"]), "2 class names for 10 classes"),
        (lambda b: b.update(std=[0.2, 0.0, 0.2]), "std positive"),
        (lambda b: b.update(mean=[0.5, 0.5]), "3 values"),
        (lambda b: b.update(input_size="big"), "missing or invalid field"),
        (lambda b: b["lineage"].update(colour="blue"), "missing or invalid field"),
        (lambda b: b.update(channel_plan=[1, 2]), "missing or invalid field"),
    ],
)
def test_invalid_description(saved, edit, message):
    edit_json(saved, edit)
    with pytest.raises(ModelFormatError, match=message) as err:
        load_model(saved)
    assert MODEL_JSON in str(err.value)
    assert "\n" not in str(err.value)


def test_json_that_is_not_an_object(saved):
    (saved / MODEL_JSON).write_text("[1, 2, 3]")
    with pytest.raises(ModelFormatError, match="not an edgetune model"):
        load_model(saved)


def test_plan_inconsistent_with_weights_names_the_tensor(saved_pruned):
    directory, pruned = saved_pruned
    real = pruned.layer1[0].out_channels

    def shrink(body):
        body["channel_plan"]["layer1.0"]["out_channels"] = real - 8

    edit_json(directory, shrink)
    with pytest.raises(ModelFormatError, match=r"'layer1\.0\.weight'") as err:
        load_model(directory)
    assert "channel plan" in str(err.value)


def test_plan_naming_a_missing_layer(saved):
    edit_json(saved, lambda b: b["channel_plan"].update({"layer9.conv": {"out_channels": 8}}))
    with pytest.raises(ModelFormatError, match="layer9.conv"):
        load_model(saved)


def test_plan_setting_an_unknown_attribute(saved):
    edit_json(saved, lambda b: b["channel_plan"]["fc"].update(kernel_size=3))
    with pytest.raises(ModelFormatError, match="kernel_size"):
        load_model(saved)


def test_weights_of_another_architecture(saved, tmp_path):
    other = tmp_path / "other"
    save_model(build_model("cifar_small", 3), ModelCard("cifar_small", 3, ["a", "b", "c"], 32), other)
    # model.json says 10 classes; the weights hold a 3-class classifier
    (saved / WEIGHTS).write_bytes((other / WEIGHTS).read_bytes())
    edit_json(saved, lambda b: b.update(weights_sha256=""))
    with pytest.raises(ModelFormatError, match="fc"):
        load_model(saved)


def test_weights_missing_a_tensor(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(saved / WEIGHTS))
    state.pop("layer3.1.running_var")
    save_file(state, str(saved / WEIGHTS))
    edit_json(saved, lambda b: b.update(weights_sha256=""))
    with pytest.raises(ModelFormatError, match="layer3.1.running_var"):
        load_model(saved)

"""Image-folder data and image-classification training (tiny ViT and ResNet built from configs, saved locally).

The task is learnable on purpose: each class is a colour (red / green / blue with noise and
random sizes), so a few dozen steps of LoRA (ViT) or norm tuning (ResNet) must lower the loss.
"""
import pytest
import torch

from edgetune.errors import DataError, EdgetuneError
from edgetune.training.data import BatchIterator, build_dataset
from edgetune.training.images import ImagePreprocessor, build_image_dataset, data_sha256

COLOURS = {"blue": (30, 40, 220), "green": (30, 200, 40), "red": (220, 30, 40)}


def make_folder(root, per_class=6, seed=0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            w, h = 24 + int(torch.randint(0, 24, (1,), generator=g)), 24 + int(torch.randint(0, 24, (1,), generator=g))
            noise = torch.randint(-40, 41, (h, w, 3), generator=g)
            px = (torch.tensor(rgb).view(1, 1, 3) + noise).clamp(0, 255).to(torch.uint8)
            Image.fromarray(px.numpy()).save(root / name / f"{i}.png")
    return root


def test_image_folder_reads_resizes_and_labels(tmp_path):
    from PIL import Image

    root = make_folder(tmp_path / "data", per_class=2)
    pre = ImagePreprocessor(16, (0.5,) * 3, (0.25,) * 3)
    ds = build_image_dataset(root, pre)
    assert ds.classes == ["blue", "green", "red"] and len(ds) == 6
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    batch = ds.rows(torch.tensor([4, 0]))
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and batch["labels"].tolist() == [2, 0]
    # the oracle: PIL resize of the shorter side to 16, centre crop, (x / 255 - mean) / std
    with Image.open(root / "red" / "0.png") as im:
        w, h = im.size
        s = 16 / min(w, h)
        nw, nh = max(16, round(w * s)), max(16, round(h * s))
        im = im.convert("RGB").resize((nw, nh), Image.BILINEAR)
        left, top = (nw - 16) // 2, (nh - 16) // 2
        ref = torch.tensor(list(im.crop((left, top, left + 16, top + 16)).getdata()), dtype=torch.float32)
    ref = ((ref.view(16, 16, 3).permute(2, 0, 1) / 255 - 0.5) / 0.25)
    assert torch.allclose(ds.rows([4])["pixel_values"][0], ref, atol=1e-6)
    # the model's labels keep their indices when they name the same classes
    ds2 = build_image_dataset(root, ImagePreprocessor(16, labels=("red", "blue", "green")))
    assert ds2.labels.tolist() == [1, 1, 2, 2, 0, 0]
    # build_dataset dispatches on the preprocessor; batches are fixed-shape and resumable as for text
    ds3 = build_dataset(root, pre, seq_len=256)
    assert len(ds3) == 6 and len(next(BatchIterator(ds3, 4, seed=0))["labels"]) == 4
    a = data_sha256(root)
    (root / "red" / "0.png").write_bytes((root / "red" / "1.png").read_bytes())
    assert data_sha256(root) != a


def test_bad_image_folders_are_one_line_errors(tmp_path):
    pre = ImagePreprocessor(16)
    with pytest.raises(DataError, match="no classes"):
        build_image_dataset((tmp_path / "empty").mkdir() or tmp_path / "empty", pre)
    with pytest.raises(DataError, match="not a directory"):
        build_image_dataset(tmp_path / "missing", pre)
    root = make_folder(tmp_path / "data", per_class=1)
    with pytest.raises(DataError, match="3 classes .* 5 outputs"):
        build_image_dataset(root, ImagePreprocessor(16, labels=tuple("abcde")))
    (root / "green" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError) as err:
        build_image_dataset(root, pre)
    assert str(err.value).startswith(str(root / "green" / "broken.jpg")) and "\n" not in str(err.value)
    assert getattr(err.value, "exit_code", 2) == 2  # an EdgetuneError: the CLI prints one line, exits 2


def _save_tiny(kind, path, num_labels=3):
    from transformers import (ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification)

    torch.manual_seed(0)
    if kind == "vit":
        model = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                    intermediate_size=64, image_size=32, patch_size=8,
                                                    num_labels=num_labels))
    else:
        model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                          layer_type="bottleneck", num_labels=num_labels))
    model.save_pretrained(str(path))
    return path


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_compiled_image_model_trains_and_loss_goes_down(tmp_path, kind):
    from edgetune.compiler import compile_model
    from edgetune.models.loader import load_model
    from edgetune.s2a.vision import LeanBatchNorm
    from edgetune.training.loop import TrainConfig, train_model

    model_dir = _save_tiny(kind, tmp_path / "model")
    model, pre, source = load_model(model_dir)
    assert isinstance(pre, ImagePreprocessor) and pre.size == (32 if kind == "vit" else 224)
    pre = ImagePreprocessor(32, pre.mean, pre.std, pre.labels)  # small images keep the ResNet test fast
    compiled = compile_model(model, "lora", r=4, alpha=8.0, act_bits=4)
    info = compiled.edgetune
    assert info.task == "image-classification" and info.to_dict()["task"] == "image-classification"
    trainable = {n for n, p in compiled.named_parameters() if p.requires_grad}
    assert sum(n.startswith("classifier.") for n in trainable) == 2  # the head's weight and bias
    if kind == "vit":
        assert any("lora_A" in n for n in trainable) and info.report.changed["attention"]
    else:  # no linear projections in the blocks: BatchNorm affine parameters train
        assert any(isinstance(m, LeanBatchNorm) for m in compiled.modules())
        assert sum(".normalization." in n for n in trainable) > 0
    data = make_folder(tmp_path / "data")
    ds = build_dataset(data, pre, seq_len=256)
    result = train_model(compiled, ds, TrainConfig(steps=30, batch=6, lr=1e-2, warmup_steps=2, save_every=0),
                         tmp_path / "run", progress=False)
    first = sum(m["loss"] for m in result.metrics[:5]) / 5
    last = sum(m["loss"] for m in result.metrics[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    compiled.eval()
    with torch.no_grad():
        logits = compiled(pixel_values=ds.rows(slice(0, len(ds)))["pixel_values"]).logits
    assert (logits.argmax(-1) == ds.labels).float().mean() == 1.0


def test_text_data_for_an_image_model_is_refused(tmp_path):
    from edgetune.compiler import compile_model
    from edgetune.models.loader import load_model
    from edgetune.training.loop import TrainConfig, train_model

    model, pre, _ = load_model(_save_tiny("vit", tmp_path / "model"))
    compiled = compile_model(model, "lora", r=4, act_bits=16)
    with pytest.raises(DataError, match="not a data file"):
        build_dataset(tmp_path / "model", object(), seq_len=16)  # a text tokenizer gets no folders
    with pytest.raises(EdgetuneError, match="image classifier"):
        train_model(compiled, object(), TrainConfig(steps=1), tmp_path / "run", progress=False)
    with pytest.raises(EdgetuneError, match="does not support image models"):
        compile_model(load_model(tmp_path / "model")[0], "sketchtune")


def _artifact_builds_image_models() -> bool:
    import inspect

    import edgetune.artifact

    return "auto_model_class" in inspect.getsource(edgetune.artifact)


# Loading a compiled image model needs ``artifact.load_compiled`` to build the model class and
# preprocessor of the config's task (``models.loader.auto_model_class`` / ``load_preprocessor``),
# the planner to skip image models, and ``api.train`` to hash a data folder
# (``training.images.data_sha256``); until those files take that change this test is skipped.
@pytest.mark.skipif(not _artifact_builds_image_models(), reason="artifact.load_compiled does not build image models yet")
@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_cli_compile_and_train_an_image_model(tmp_path, capsys, kind):
    import json

    from edgetune.cli import main

    model = _save_tiny(kind, tmp_path / "model")
    if kind == "resnet":  # keep the test fast: 32x32 inputs
        (model / "preprocessor_config.json").write_text(json.dumps({"crop_size": {"height": 32, "width": 32}}))
    data = make_folder(tmp_path / "data")
    out = tmp_path / "compiled"
    assert main(["compile", str(model), "--recipe", "lora", "--r", "4", "--act-bits", "4", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == "image-classification"
    assert main(["train", str(out), "--data", str(data), "--steps", "30", "--batch", "6", "--lr", "1e-2",
                 "--warmup-steps", "2", "--out", str(tmp_path / "run")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert sum(losses[-5:]) < 0.6 * sum(losses[:5])
    capsys.readouterr()
    (data / "red" / "bad.png").write_text("no")
    assert main(["train", str(out), "--data", str(data), "--steps", "1", "--out", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.png" in err
    assert main(["train", str(out), "--data", str(tmp_path / "nothing"), "--steps", "1",
                 "--out", str(tmp_path / "run3")]) == 2

"""Small datasets and configs that several trainer tests build (imported by them; not a test module)."""

from PIL import Image

from trainer.config import build_train_config


def img(path, size=(16, 16), color=(200, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def data_cfg(dataset, **over):
    """A config for reading `dataset` (the base model is never loaded by these tests)."""
    return build_train_config({"base_model": "builtin:tiny-sd", "dataset": str(dataset), "resolution": 64, **over})


def small_kohya_dataset(root, n=3):
    """`n` distinct captioned 64 px pictures in one kohya folder (`2_sks circle/`)."""
    sub = root / "2_sks circle"
    sub.mkdir(parents=True)
    for i in range(n):
        im = Image.new("RGB", (64, 64), (40 * i, 120, 200))
        im.paste((220, 30, 30), (8 + 4 * i, 8, 40, 40 + 4 * i))
        im.save(sub / f"img_{i}.png")
        (sub / f"img_{i}.txt").write_text(f"sks, a red square number {i}")
    return root

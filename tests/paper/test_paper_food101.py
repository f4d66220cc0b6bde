import json

import numpy as np
import pytest
import torch
from paper_fixtures import FOOD_CLASSES, write_food101, write_food_cache

from cggm.data import DataError, load_dataset
from cggm.data.paper import food101


def test_food_cache_read_directly(tmp_path):
    cache = write_food_cache(tmp_path / "cache")
    data = load_dataset("food101", path=str(tmp_path / "unused"), features=str(cache))
    same = load_dataset("food101", path=str(cache))  # a cache passed as the data path
    assert data.modalities == ("image", "text") and data.task.num_outputs == 4
    assert data.input_shapes == {"image": (5, 16), "text": (7, 12)}
    assert len(same.train) == len(data.train)
    # validation is carved from train (stratified, seeded), never from test
    assert len(data.train) + len(data.val) == 12 and len(data.test) == 6
    assert set(data.train.index.tolist()).isdisjoint(data.val.index.tolist())
    assert data.val.arrays["image"] is data.train.arrays["image"]
    assert data.test.arrays["image"] is not data.train.arrays["image"]
    inputs, masks, target = data.train.get_batch(torch.tensor([2, 0, 1]))
    assert inputs["image"].dtype == torch.float32 and inputs["image"].shape == (3, 5, 16)
    rows = data.train.index[[2, 0, 1]]
    assert torch.equal(target, torch.from_numpy(np.load(cache / "train_labels.npy")[rows]))
    assert torch.allclose(inputs["text"][0], torch.from_numpy(np.load(cache / "train_text.npy")[rows[0]].astype(np.float32)))
    assert masks["text"].shape == (3, 7) and "image" not in masks
    x, _m, y = data.val[0]
    assert x["image"].shape == (5, 16) and y.ndim == 0


@pytest.mark.parametrize("edit, message", [
    (lambda c: np.save(c / "train_image.npy", np.full((12, 5, 16), np.nan, np.float16)), "train_image.npy .*NaN"),
    (lambda c: np.save(c / "test_labels.npy", np.arange(6) + 2), r"test_labels.npy: labels range over \[2, 7\]"),
    (lambda c: np.save(c / "train_text_mask.npy", np.zeros((12, 7), bool)), "row 0 has no real token"),
    (lambda c: np.save(c / "test_text.npy", np.zeros((5, 7, 12), np.float16)), "test_text.npy: 5 rows"),
    (lambda c: np.save(c / "train_image.npy", np.zeros((12, 16), np.float16)), "train_image.npy: expected a 3-d"),
    (lambda c: (c / "test_text_mask.npy").unlink(), "test_text_mask.npy: not found"),
    (lambda c: (c / "meta.json").write_text(json.dumps({"format": "x"})), "meta.json: expected format"),
])
def test_food_cache_errors(tmp_path, edit, message):
    cache = write_food_cache(tmp_path / "cache")
    edit(cache)
    with pytest.raises(DataError, match=message):
        load_dataset("food101", path=str(tmp_path), features=str(cache))


def test_food_raw_needs_models_or_features(tmp_path):
    pytest.importorskip("PIL")
    root = write_food101(tmp_path / "food")
    with pytest.raises(DataError, match="dataset.options.vit"):
        load_dataset("food101", path=str(root))


def _tiny_models(tmp_path):
    transformers = pytest.importorskip("transformers")
    vit = transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=16,
                                                       num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=32))
    vit.save_pretrained(tmp_path / "vit")
    (tmp_path / "vit" / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "best", "recipe", "number", ","]
    words += [w for c in FOOD_CLASSES for w in c.split("_")] + [str(i) for i in range(10)]
    (tmp_path / "vocab.txt").write_text("\n".join(words))
    tok = transformers.BertTokenizer(vocab_file=str(tmp_path / "vocab.txt"))
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=len(words), hidden_size=12, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=24,
                                                          max_position_embeddings=64))
    bert.save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    return tmp_path / "vit", tmp_path / "bert"


def test_food_feature_extraction_with_local_models(tmp_path, monkeypatch):
    pytest.importorskip("PIL")
    vit, bert = _tiny_models(tmp_path)
    root = write_food101(tmp_path / "food")
    data = load_dataset("food101", path=str(root), vit=str(vit), bert=str(bert), image_grid=2, text_len=12,
                        val_fraction=0.2, batch_size=4)
    assert data.task.num_outputs == 3 and data.info["classes"] == sorted(FOOD_CLASSES)
    assert data.input_shapes == {"image": (5, 16), "text": (12, 12)}  # CLS + 2x2 pooled patches; 12 tokens
    assert len(data.train) + len(data.val) == 15 and len(data.val) == 3 and len(data.test) == 6
    assert data.info["settings"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    inputs, masks, target = data.test.get_batch(torch.arange(6))
    assert target.tolist() == [0, 0, 1, 1, 2, 2]
    assert masks["text"][:, 0].all() and not masks["text"].all()  # padded to 12 tokens
    assert bool(torch.isfinite(inputs["image"]).all())

    # the same settings reuse the cache: no second extraction
    monkeypatch.setattr(food101, "extract_features", lambda *a, **k: pytest.fail("re-extracted"))
    again = load_dataset("food101", path=str(root), vit=str(vit), bert=str(bert), image_grid=2, text_len=12,
                         val_fraction=0.2)
    assert torch.equal(again.test.get_batch(torch.arange(6))[0]["text"], inputs["text"])


def test_food_extraction_errors(tmp_path):
    pytest.importorskip("PIL")
    vit, bert = _tiny_models(tmp_path)
    root = write_food101(tmp_path / "food")
    missing = root / "images" / "test" / "bibimbap" / "bibimbap_test1.png"
    missing.unlink()
    with pytest.raises(DataError, match="bibimbap_test1.png: image not found"):
        load_dataset("food101", path=str(root), vit=str(vit), bert=str(bert))
    missing.write_bytes(b"not an image")
    with pytest.raises(DataError, match="bibimbap_test1.png: cannot read the image"):
        load_dataset("food101", path=str(root), vit=str(vit), bert=str(bert))
    (root / "texts" / "train_titles.csv").write_text("a.jpg,only two fields\n")
    with pytest.raises(DataError, match="train_titles.csv: line 1 has 2 fields"):
        load_dataset("food101", path=str(root), vit=str(vit), bert=str(bert))

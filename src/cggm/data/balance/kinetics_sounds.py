"""Kinetics-Sounds (Arandjelovic & Zisserman, ICCV 2017): Kinetics-400 clips of classes that can
be heard, audio + video; 31 classes in OGM-GE (CVPR 2022), PMR, MMPareto and BalanceBenchmark.

Kinetics-Sounds is not distributed as such: it is built from Kinetics-400 (download the videos,
e.g. with https://github.com/cvdfoundation/kinetics-dataset) with the papers' class and clip
lists. Layouts read (``path``)::

    path/my_train.txt, path/my_test.txt      OGM-GE's lists: "clip,10,label id", e.g. "-4r6VLqGeK4_000106_000116,10,27"
      (or ks_train_overlap.txt / ks_test_overlap.txt, "clip ... label id" separated by spaces, as
       BalanceBenchmark's; or train.txt / test.txt in either form; labels may also be class names)
    path/train_spec/<clip>.npy               pre-computed spectrograms (OGM-GE's process_audio.py writes a
    path/test_spec/<clip>.npy                 [1024, 128] log-mel fbank), or path/audio/<clip>.wav|.npy|.pkl|.pt
    path/train-frames-1fps/train/<clip>/frame_00001.jpg ...   frames at 1 fps (BalanceBenchmark's paths;
    path/val-frames-1fps/test/<clip>/...      also path/visual/<clip>/, or OGM-GE's path/train/<clip>/ and
                                              path/test/<clip>/ holding the frames and <clip>.wav)
    path/classes.txt or path/stat.txt        optional: class names, one per line (when the lists use names)

Audio from wav files uses ``audio_recipe="logmel_10s"`` (10 s at 16 kHz, 128 HTK mel bands,
``[1, 128, 997]``); pre-computed spectrograms are used as stored (every clip must have the same
shape). Frames: ``frames`` (default 3, as the papers) picked evenly, resized to ``image_size``.
Validation: a class-stratified ``val_fraction`` (10 %) of train, seeded; test is the test list,
used once. Listed clips whose audio or frames are missing (many Kinetics videos are no longer
online) are skipped and counted in ``info["missing"]``.
"""

from __future__ import annotations

from ..base import DataSplits
from ..registry import register_dataset
from ._av import SplitSource, data_root, dirs, first_file, load_av, make_spec, need_list, read_classes

TITLE = "Kinetics-Sounds"
WHERE = ("Build it from Kinetics-400 (videos: https://github.com/cvdfoundation/kinetics-dataset) with the clip "
         "lists of OGM-GE (https://github.com/GeWu-Lab/OGM-GE_CVPR2022, data/KineticSound/my_train.txt, "
         "my_test.txt); extract frames and wav files with `python -m cggm.data.balance.prepare kinetics_sounds "
         "--root DIR` (needs ffmpeg).")
LAYOUT = """
    path/my_train.txt, path/my_test.txt       rows "clip,10,label id" (or ks_*_overlap.txt / train.txt / test.txt)
    path/train_spec/<clip>.npy, path/test_spec/<clip>.npy   spectrograms (or path/audio/<clip>.wav|.npy|.pkl|.pt)
    path/train-frames-1fps/train/<clip>/*.jpg, path/val-frames-1fps/test/<clip>/*.jpg   (or path/visual/<clip>/*.jpg)
"""
AUDIO = {"train": ["train_spec", "audio_spec", "audio", "train_wav/train", "train"],
         "test": ["test_spec", "audio_spec", "audio", "test_wav/test", "test"]}
VISUAL = {"train": ["train-frames-1fps/train", "train-frames-1fps", "visual", "train"],
          "test": ["val-frames-1fps/test", "test-frames-1fps/test", "val-frames-1fps", "test-frames-1fps", "visual",
                   "test"]}
LISTS = {"train": ["my_train.txt", "ks_train_overlap.txt", "train.txt", "train.csv"],
         "test": ["my_test.txt", "ks_test_overlap.txt", "test.txt", "test.csv"]}


@register_dataset("kinetics_sounds")
def load_kinetics_sounds(path: str | None = None, num_classes: int | None = 31, frames: int = 3, image_size: int = 224,
                         audio_recipe: str = "logmel_10s", audio_options: dict | None = None, val_fraction: float = 0.1,
                         seed: int = 0, train_list: str | None = None, test_list: str | None = None,
                         audio_dir: str | dict | None = None, visual_dir: str | dict | None = None,
                         cache_dir: str | None = None, strict: bool = False, dtype: str = "float16",
                         augment: bool = True) -> DataSplits:
    """Kinetics-Sounds (see the module docstring). ``num_classes`` applies to integer labels
    (default 31; ``None`` infers it from the largest label)."""
    root = data_root(path, TITLE, WHERE, LAYOUT)
    lists = {s: need_list(root, given, LISTS[s], s, WHERE, LAYOUT)
             for s, given in (("train", train_list), ("test", test_list))}
    stat = first_file(root, ["classes.txt", "stat.txt", "stat.csv"])
    classes = read_classes(stat) if stat else None
    sources = {s: SplitSource(lists[s], "clip_label", dirs(root, audio_dir, s, AUDIO[s]),
                              dirs(root, visual_dir, s, VISUAL[s])) for s in lists}
    return load_av("kinetics_sounds", root, sources, classes=classes, num_classes=num_classes,
                   spec=make_spec(audio_recipe, audio_options), frames=frames, image_size=image_size,
                   val_fraction=val_fraction, seed=seed, cache_dir=cache_dir, strict=strict, dtype=dtype,
                   augment=augment, description="Kinetics-Sounds")

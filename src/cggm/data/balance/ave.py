"""AVE, the Audio-Visual Event dataset (Tian et al., ECCV 2018): 4,143 ten-second videos of 28
event classes, audio + video; used by OGM-GE (CVPR 2022), PMR, AGM and their successors.

Layouts read (``path``, the unpacked ``AVE_Dataset`` folder)::

    path/trainSet.txt, path/valSet.txt, path/testSet.txt   AVE's split lists, one video per line:
                                        "Category&VideoID&Quality&StartTime&EndTime",
                                        e.g. "Church bell&RUhOCu3LNXM&good&0&10"
      (or OGM-GE's path/my_train.txt, path/my_test.txt, rows "class,VideoID")
    path/Audio-1004-SE/<VideoID>.pkl    pre-computed spectrograms (PMR's layout, [257, 1004]); or
    path/audio_spec/<VideoID>.pkl       OGM-GE's; or path/audio/<VideoID>.wav (computed with
                                        ``audio_recipe="pmr_ave"``: 10 s at 16 kHz, scipy-style PSD
                                        spectrogram, nperseg 512, noverlap 353, log, per-clip standardised)
    path/Image-01-FPS-SE/<VideoID>/*.jpg   frames at 1 fps (PMR's layout; or path/visual/<VideoID>/*.jpg)
    path/stat.txt or path/classes.txt   optional: the class names, one per line
    path/AVE/<VideoID>.mp4              the original videos (read only by the ffmpeg helper)

Validation: ``valSet.txt`` when present (AVE's official split), otherwise a class-stratified
``val_fraction`` of train. Test: ``testSet.txt`` (or ``my_test.txt``), used once. A video listed
twice in one list with different classes is dropped (as OGM-GE's loader does). Frames: ``frames``
(default 3, as the papers) picked evenly, resized to ``image_size``.

Not done: PMR crops the audio and frames of each video to its annotated event segment
(``StartTime`` to ``EndTime``, the ``-SE`` folders); wav files are read whole here, so a cropped
layout must come pre-computed.
"""

from __future__ import annotations

from ..base import DataSplits
from ..registry import register_dataset
from ._av import SplitSource, data_root, dirs, first_file, load_av, make_spec, need_list, read_classes

TITLE = "AVE"
WHERE = ("Get AVE_Dataset.zip from the authors' page (https://sites.google.com/view/audiovisualresearch, linked "
         "from https://github.com/YapengTian/AVE-ECCV18): it holds AVE/<VideoID>.mp4, Annotations.txt and the "
         "trainSet/valSet/testSet lists; extract frames and wav files with `python -m cggm.data.balance.prepare ave "
         "--root DIR` (needs ffmpeg).")
LAYOUT = """
    path/trainSet.txt, path/valSet.txt, path/testSet.txt   rows "Category&VideoID&Quality&StartTime&EndTime"
                                                          (or my_train.txt / my_test.txt, rows "class,VideoID")
    path/Audio-1004-SE/<VideoID>.pkl    spectrograms (or path/audio_spec/<VideoID>.pkl, path/audio/<VideoID>.wav)
    path/Image-01-FPS-SE/<VideoID>/*.jpg   frames (or path/visual/<VideoID>/*.jpg)
"""
AUDIO = ["Audio-1004-SE", "audio_spec", "audio"]
VISUAL = ["Image-01-FPS-SE", "Image-01-FPS", "visual"]


@register_dataset("ave")
def load_ave(path: str | None = None, frames: int = 3, image_size: int = 224, audio_recipe: str = "pmr_ave",
             audio_options: dict | None = None, val_fraction: float = 0.1, seed: int = 0,
             train_list: str | None = None, val_list: str | None = None, test_list: str | None = None,
             audio_dir: str | dict | None = None, visual_dir: str | dict | None = None, cache_dir: str | None = None,
             strict: bool = False, dtype: str = "float16", augment: bool = True) -> DataSplits:
    """AVE, 28 event classes (see the module docstring)."""
    root = data_root(path, TITLE, WHERE, LAYOUT)
    train = need_list(root, train_list, ["trainSet.txt", "my_train.txt"], "train", WHERE, LAYOUT)
    test = need_list(root, test_list, ["testSet.txt", "my_test.txt"], "test", WHERE, LAYOUT)
    val = first_file(root, [val_list] if val_list else (["valSet.txt"] if train.name == "trainSet.txt" else []))
    if val_list and val is None:
        need_list(root, val_list, [], "validation", WHERE, LAYOUT)
    stat = first_file(root, ["stat.txt", "classes.txt", "stat.csv"])
    files = {"train": train, "test": test, **({"val": val} if val is not None else {})}
    sources = {s: SplitSource(f, "label_clip", dirs(root, audio_dir, s, AUDIO), dirs(root, visual_dir, s, VISUAL))
               for s, f in files.items()}
    return load_av("ave", root, sources, classes=read_classes(stat) if stat else None, num_classes=None,
                   spec=make_spec(audio_recipe, audio_options), frames=frames, image_size=image_size,
                   val_fraction=val_fraction, seed=seed, cache_dir=cache_dir, strict=strict, dtype=dtype,
                   augment=augment, description="AVE, 28 audio-visual events")

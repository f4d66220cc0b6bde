"""CREMA-D (Cao et al., IEEE TAFFC 2014): audio + face video of actors, 6 emotions.

The benchmark of OGM-GE (CVPR 2022) and its successors (PMR, AGM, MMPareto, InfoReg, ...), where
audio is the dominant modality. Layout (``path``; what the CREMA-D release and OGM-GE's
preprocessing produce)::

    path/AudioWAV/1001_DFA_ANG_XX.wav         the release's wav files (or path/audio/<clip>.wav; a
                                              pre-computed spectrogram <clip>.npy / .pkl / .pt is read as stored)
    path/Image-01-FPS/1001_DFA_ANG_XX/*.jpg   frames extracted at 1 fps (OGM-GE's layout; or
                                              path/visual/<clip>/*.jpg); any image names, natural order
    path/train.csv, path/test.csv             rows "clip,EMO", e.g. "1001_DFA_ANG_XX,ANG" (OGM-GE's lists)
    path/stat.csv                             optional: the class codes, one per line

Classes: NEU, HAP, SAD, FEA, DIS, ANG, in that order (OGM-GE's ``stat.csv``) unless ``stat.csv``
says otherwise. Audio (``audio_recipe="ogm_cremad"``, OGM-GE's recipe): resampled to 22050 Hz,
repeated to 3 s, STFT with n_fft 512 and hop 353 (Hann, centred), ``log(|S| + 1e-7)``:
``[1, 257, 188]`` per clip. Frames: ``frames`` (default 1, as OGM-GE; MMPareto and BalanceBenchmark
use 2) picked evenly from the clip's folder, resized to ``image_size`` (224): ``[frames, 3, 224, 224]``.
Validation: a class-stratified ``val_fraction`` (10 %) of train, seeded; test is ``test.csv``,
used once. Clips listed without audio or frames are skipped (as in the papers' code) and counted
in ``info["missing"]``; ``strict=True`` makes them an error.

The first load decodes every clip into a cache (``path/cggm_cache/`` or ``cache_dir``).
"""

from __future__ import annotations

from ..base import DataSplits
from ..registry import register_dataset
from ._av import SplitSource, data_root, dirs, first_file, load_av, make_spec, need_list, read_classes

CLASSES = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
TITLE = "CREMA-D"
WHERE = ("Get the wav files (AudioWAV/) and the videos (VideoFlash/*.flv) from the CREMA-D release, "
         "https://github.com/CheyneyComputerScience/CREMA-D (git-lfs; Kaggle mirrors usually hold AudioWAV/ only), "
         "extract frames with `python -m cggm.data.balance.prepare cremad --root DIR` (needs ffmpeg), and take "
         "train.csv / test.csv from OGM-GE's repository, https://github.com/GeWu-Lab/OGM-GE_CVPR2022 (data/CREMAD/).")
LAYOUT = """
    path/AudioWAV/<clip>.wav            e.g. 1001_DFA_ANG_XX.wav (or path/audio/<clip>.wav|.npy|.pkl|.pt)
    path/Image-01-FPS/<clip>/*.jpg      frames at 1 fps (or path/visual/<clip>/*.jpg)
    path/train.csv, path/test.csv       rows "clip,EMO", e.g. "1001_DFA_ANG_XX,ANG"
"""


@register_dataset("cremad")
def load_cremad(path: str | None = None, frames: int = 1, image_size: int = 224, fps: int = 1,
                audio_recipe: str = "ogm_cremad", audio_options: dict | None = None, val_fraction: float = 0.1,
                seed: int = 0, train_list: str | None = None, test_list: str | None = None,
                audio_dir: str | dict | None = None, visual_dir: str | dict | None = None, cache_dir: str | None = None,
                strict: bool = False, dtype: str = "float16", augment: bool = True) -> DataSplits:
    """CREMA-D, 6 emotions, audio spectrogram + face frames (see the module docstring)."""
    root = data_root(path, TITLE, WHERE, LAYOUT)
    lists = {s: need_list(root, given, [f"{s}.csv"], s, WHERE, LAYOUT)
             for s, given in (("train", train_list), ("test", test_list))}
    stat = first_file(root, ["stat.csv"])
    classes = read_classes(stat) if stat else list(CLASSES)
    sources = {s: SplitSource(lists[s], "clip_label", dirs(root, audio_dir, s, ["AudioWAV", "audio"]),
                              dirs(root, visual_dir, s, [f"Image-{int(fps):02d}-FPS", "visual"]))
               for s in lists}
    return load_av("cremad", root, sources, classes=classes, num_classes=None,
                   spec=make_spec(audio_recipe, audio_options), frames=frames, image_size=image_size,
                   val_fraction=val_fraction, seed=seed, cache_dir=cache_dir, strict=strict, dtype=dtype,
                   augment=augment, description="CREMA-D, 6 emotions")

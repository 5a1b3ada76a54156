"""Text-image retrieval with an image as a one-frame video: MS-COCO and Flickr30K in
Karpathy's split layout.

``root/dataset_coco.json`` / ``root/dataset_flickr30k.json`` (option ``annotation``):
``images`` with ``split`` (train/restval/val/test), ``filename``, ``filepath`` (COCO) and
``sentences`` (``raw``). Images are found under option ``image_root`` or root, as
``<filepath>/<filename>``, ``images/<filepath>/<filename>``, ``images/<filename>``,
``flickr30k-images/<filename>`` or ``<filename>``. The first ``captions_per_image`` (5)
captions of each image are its items. Train = train + restval; test: COCO 5k (option
``test_size="1k"``: the first 1,000 test images), Flickr30K 1k. Use ``max_frames=1``. An
image not found is a missing video (see :class:`~nbretr.data.base.VideoTextDataset`).
"""
from __future__ import annotations

from pathlib import Path

from nbretr.data._layout import need_key, read_json
from nbretr.data.base import VideoRecord, VideoTextDataset


class KarpathyImages(VideoTextDataset):
    name = "coco"
    annotation = "dataset_coco.json"

    def _candidates(self, img: dict) -> list[Path]:
        roots = [Path(self._options["image_root"])] if self._options.get("image_root") else [self.root]
        fp, fn = img.get("filepath", "") or "", img["filename"]
        out = []
        for r in roots:
            out += [r / fp / fn, r / "images" / fp / fn, r / "images" / fn, r / "flickr30k-images" / fn, r / fn]
        return out

    def _read(self):
        ann = Path(self._options.get("annotation") or self.root / self.annotation)
        images = need_key(self, ann, read_json(self, ann, dict), "images", list)
        self.video_folder = Path(self._options["image_root"]) if self._options.get("image_root") else self.root
        self.video_pattern = "<filepath>/<filename> (or images/..., flickr30k-images/<filename>)"
        want = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}[self.split]
        n_caps = int(self._options.get("captions_per_image", 5))
        limit = {"1k": 1000, "5k": 5000}.get(self._options.get("test_size", "5k"))
        videos, pairs = [], []
        pattern: int | None = None  # which candidate layout matched: tried first for the rest
        for k, img in enumerate(images):
            if not isinstance(img, dict) or not isinstance(img.get("filename"), str) \
                    or not isinstance(img.get("sentences"), list):
                self._problem(ann, f"images[{k}]", f"malformed image entry {str(img)[:120]}")
                continue
            if img.get("split") not in want:
                continue
            if self.split == "test" and limit is not None and len(videos) >= limit:
                break
            caps = [s.get("raw") for s in img["sentences"] if isinstance(s, dict)]
            caps = [c.strip() for c in caps if isinstance(c, str) and c.strip()][:n_caps]
            if not caps:
                self._problem(ann, f"images[{k}]", f"image {img['filename']} has no caption")
                continue
            cands = self._candidates(img)
            order = ([pattern] if pattern is not None else []) + [i for i in range(len(cands)) if i != pattern]
            hit = next((i for i in order if cands[i].is_file()), None)
            vi = len(videos)
            if hit is None:
                videos.append(VideoRecord(Path(img["filename"]).stem, cands[0], missing=True))
            else:
                pattern = hit
                videos.append(VideoRecord(Path(img["filename"]).stem, cands[hit]))
            pairs += [(c, vi) for c in caps]
        return videos, pairs


class COCO(KarpathyImages):
    name = "coco"
    annotation = "dataset_coco.json"


class Flickr30K(KarpathyImages):
    name = "flickr30k"
    annotation = "dataset_flickr30k.json"

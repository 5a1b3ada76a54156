"""ActivityNet Captions in the reference's layout, as paragraph-to-video retrieval.

``root/train_ids.json`` / ``root/val_ids.json`` (lists of ids ``v_<youtube id>``),
``root/train.json`` / ``root/val_1.json`` (id -> {duration, timestamps, sentences}); the
``val`` and ``test`` splits both read val_1 (the reference evaluates there). Videos
``v_<id>.<ext>`` in ``root/videos`` (or ``Activity_Videos``, ``activitynet``, root; option
``video_dir``). A video's sentences are joined into one paragraph and the whole video is
sampled. The paper uses ``max_words=64, max_frames=64`` here.
"""
from __future__ import annotations

from nbretr.data._layout import lookup, read_json, video_dir
from nbretr.data.base import VideoRecord, VideoTextDataset
from nbretr.data.decoding import index_folder


class ActivityNet(VideoTextDataset):
    name = "activitynet"

    def _read(self):
        vdir = video_dir(self, ("videos", "Activity_Videos", "activitynet", "video"))
        index = index_folder(vdir)
        ids_path = self.root / ("train_ids.json" if self.split == "train" else "val_ids.json")
        data_path = self.root / ("train.json" if self.split == "train" else "val_1.json")
        ids = read_json(self, ids_path) or []
        data = read_json(self, data_path) or {}
        videos, pairs = [], []
        for k, vid in enumerate(ids):
            if not isinstance(vid, str) or not vid:
                self._problem(ids_path, f"[{k}]", f"malformed id {vid!r}")
                continue
            ann = data.get(vid)
            if ann is None:
                self._problem(ids_path, f"[{k}]", f"video {vid} has no entry in {data_path.name}")
                continue
            sents = ann.get("sentences") if isinstance(ann, dict) else None
            if not isinstance(sents, list) or not sents or not all(isinstance(s, str) for s in sents):
                self._problem(data_path, vid, f"malformed entry (need a list of sentences): {str(ann)[:120]}")
                continue
            path = lookup(index, vid, ("", "v_")) or (lookup(index, vid[2:]) if vid.startswith("v_") else None)
            if path is None:
                self._problem(ids_path, f"[{k}]", f"video {vid} not found in {vdir}")
                continue
            pairs.append((" ".join(s.strip() for s in sents), len(videos)))
            videos.append(VideoRecord(vid, path))
        return videos, pairs

"""ActivityNet Captions in the reference's layout, as paragraph-to-video retrieval.

``root/train_ids.json`` / ``root/val_ids.json`` (lists of ids ``v_<youtube id>``),
``root/train.json`` / ``root/val_1.json`` (id -> {duration, timestamps, sentences}); the
``val`` and ``test`` splits both read val_1 (the reference evaluates there). Videos
``v_<id>.<ext>`` (or ``<id>.<ext>``; any extension, searched recursively, e.g.
``videos/train/`` and ``videos/val/``) under ``root/videos`` (or ``Activity_Videos``,
``activitynet``, ``video``, root; option ``video_dir``). As the reference: ids in list
order, a repeated id once, a video's sentences joined into one paragraph, the whole video
sampled (the reference's window is 0 to ceil(duration)). The paper uses
``max_words=64, max_frames=64`` here.
"""
from __future__ import annotations

from nbretr.data._layout import first_occurrences, read_json
from nbretr.data.base import VideoTextDataset


class ActivityNet(VideoTextDataset):
    name = "activitynet"

    def _read(self):
        index = self._video_index(("videos", "Activity_Videos", "activitynet", "video"), "v_<id>.mp4")
        ids_path = self.root / ("train_ids.json" if self.split == "train" else "val_ids.json")
        data_path = self.root / ("train.json" if self.split == "train" else "val_1.json")
        ids = read_json(self, ids_path, list)
        data = read_json(self, data_path, dict)
        listed = []
        for k, vid in enumerate(ids):
            if not isinstance(vid, str) or not vid:
                self._problem(ids_path, f"[{k}]", f"malformed id {vid!r}")
                continue
            listed.append((k, vid))
        videos, pairs = [], []
        for k, vid in first_occurrences(self, listed, key=str):
            ann = data.get(vid)
            if ann is None:
                self._problem(ids_path, f"[{k}]", f"video {vid} has no entry in {data_path.name}")
                continue
            sents = ann.get("sentences") if isinstance(ann, dict) else None
            if not isinstance(sents, list) or not sents or not all(isinstance(s, str) for s in sents):
                self._problem(data_path, vid, f"malformed entry (need a list of sentences): {str(ann)[:120]}")
                continue
            rec = self._video(index, vid, ("", "v_"))
            if rec.missing and vid.startswith("v_"):  # files named without the v_ prefix
                alt = self._video(index, vid[2:])
                rec = rec if alt.missing else alt
                rec.video_id = vid
            pairs.append((" ".join(s.strip() for s in sents), len(videos)))
            videos.append(rec)
        return videos, pairs

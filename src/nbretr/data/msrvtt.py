"""MSR-VTT in the reference's layout.

``root/MSRVTT_data.json`` (``sentences``: ``video_id``, ``caption``),
``root/MSRVTT_train.9k.csv`` / ``MSRVTT_train.7k.csv`` (column ``video_id``; option
``train_list="9k"|"7k"``), ``root/MSRVTT_JSFUSION_test.csv`` (columns key, vid_key,
video_id, sentence: the 1k-A test, also used for ``val``), videos ``<video_id>.mp4`` in
``root/videos`` (or ``MSRVTT_Videos``, ``videos/all``, root; option ``video_dir``).
Train: one item per caption of every train video (20 each); test: 1,000 caption-video pairs.
"""
from __future__ import annotations

import csv

from nbretr.data._layout import lookup, read_json, video_dir
from nbretr.data.base import VideoRecord, VideoTextDataset
from nbretr.data.decoding import index_folder


class MSRVTT(VideoTextDataset):
    name = "msrvtt"

    def _csv(self, path, need: tuple[str, ...]):
        if not path.is_file():
            raise FileNotFoundError(f"{self.name}: annotation file {path} does not exist")
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in need if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{self.name}: {path} has no column(s) {missing} (header {reader.fieldnames})")
            for row in reader:
                bad = [c for c in need if not (row.get(c) or "").strip()]
                if bad or None in row:
                    self._problem(path, reader.line_num, f"malformed row (missing {bad or 'columns'}): "
                                  f"{dict((k, v) for k, v in row.items() if k)!r}"[:200])
                    continue
                yield reader.line_num, row

    def _read(self):
        vdir = video_dir(self, ("videos", "MSRVTT_Videos", "videos/all", "video"))
        index = index_folder(vdir)
        videos, pairs = [], []
        if self.split == "train":
            which = self._options.get("train_list", "9k")
            if which not in ("9k", "7k"):
                raise ValueError(f"msrvtt: train_list must be '9k' or '7k', got {which!r}")
            data_path = self.root / "MSRVTT_data.json"
            data = read_json(self, data_path) or {}
            caps: dict[str, list[str]] = {}
            for k, s in enumerate(data.get("sentences", [])):
                if not isinstance(s, dict) or not s.get("video_id") or not isinstance(s.get("caption"), str):
                    self._problem(data_path, f"sentences[{k}]", f"malformed sentence entry {str(s)[:120]}")
                    continue
                caps.setdefault(s["video_id"], []).append(s["caption"])
            csv_path = self.root / f"MSRVTT_train.{which}.csv"
            for line, row in self._csv(csv_path, ("video_id",)):
                vid = row["video_id"].strip()
                path = lookup(index, vid)
                if path is None:
                    self._problem(csv_path, line, f"video {vid} not found in {vdir}")
                    continue
                if vid not in caps:
                    self._problem(csv_path, line, f"video {vid} has no caption in {data_path.name}")
                    continue
                vi = len(videos)
                videos.append(VideoRecord(vid, path))
                pairs += [(c, vi) for c in caps[vid]]
        else:
            csv_path = self.root / "MSRVTT_JSFUSION_test.csv"
            seen: dict[str, int] = {}
            for line, row in self._csv(csv_path, ("video_id", "sentence")):
                vid = row["video_id"].strip()
                if vid not in seen:
                    path = lookup(index, vid)
                    if path is None:
                        self._problem(csv_path, line, f"video {vid} not found in {vdir}")
                        continue
                    seen[vid] = len(videos)
                    videos.append(VideoRecord(vid, path))
                pairs.append((row["sentence"], seen[vid]))
        return videos, pairs

"""MSR-VTT in the reference's layout.

``root/MSRVTT_data.json`` (``sentences``: ``video_id``, ``caption``),
``root/MSRVTT_train.9k.csv`` / ``MSRVTT_train.7k.csv`` (column ``video_id``; option
``train_list="9k"|"7k"``), ``root/MSRVTT_JSFUSION_test.csv`` (columns key, vid_key,
video_id, sentence: the 1k-A test, also used for ``val``), videos ``<video_id>.mp4`` (any
video extension, searched recursively) under ``root/videos`` (or ``MSRVTT_Videos``,
``video``, root; option ``video_dir``).

Train: one item per caption of every listed video, in the order of ``MSRVTT_data.json``'s
``sentences`` (as the reference, which walks the JSON and keeps the listed videos); test:
the CSV's rows in order, 1,000 caption-video pairs.
"""
from __future__ import annotations

import csv

from nbretr.data._layout import AnnotationError, first_occurrences, need_key, read_json
from nbretr.data.base import VideoTextDataset


class MSRVTT(VideoTextDataset):
    name = "msrvtt"

    def _csv(self, path, need: tuple[str, ...]):
        if not path.is_file():
            raise FileNotFoundError(f"{self.name}: annotation file {path} does not exist")
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in need if c not in (reader.fieldnames or [])]
            if missing:
                raise AnnotationError(f"{self.name}: {path} has no column(s) {missing} (its header: "
                                      f"{reader.fieldnames}); is it the right file?")
            for row in reader:
                bad = [c for c in need if not (row.get(c) or "").strip()]
                if bad or None in row:
                    self._problem(path, reader.line_num, f"malformed row (missing {bad or 'columns'}): "
                                  f"{dict((k, v) for k, v in row.items() if k)!r}"[:200])
                    continue
                yield reader.line_num, row

    def _read(self):
        index = self._video_index(("videos", "MSRVTT_Videos", "video"), "<video_id>.mp4")
        videos, pairs = [], []
        position: dict[str, int] = {}

        def video(vid: str) -> int:
            if vid not in position:
                position[vid] = len(videos)
                videos.append(self._video(index, vid))
            return position[vid]

        if self.split == "train":
            which = self._options.get("train_list", "9k")
            if which not in ("9k", "7k"):
                raise ValueError(f"msrvtt: train_list must be '9k' or '7k', got {which!r}")
            csv_path = self.root / f"MSRVTT_train.{which}.csv"
            rows = self._csv(csv_path, ("video_id",))
            listed = first_occurrences(self, [(line, row["video_id"].strip()) for line, row in rows])
            data_path = self.root / "MSRVTT_data.json"
            sentences = need_key(self, data_path, read_json(self, data_path, dict), "sentences", list)
            wanted = {vid for _, vid in listed}
            captioned = set()
            for k, s in enumerate(sentences):
                if not isinstance(s, dict) or not isinstance(s.get("video_id"), str) \
                        or not isinstance(s.get("caption"), str):
                    self._problem(data_path, f"sentences[{k}]", f"malformed sentence entry {str(s)[:120]}")
                    continue
                if s["video_id"] in wanted:
                    captioned.add(s["video_id"])
                    pairs.append((s["caption"], video(s["video_id"])))
            for line, vid in listed:
                if vid not in captioned:
                    self._problem(csv_path, line, f"video {vid} has no caption in {data_path.name}")
        else:
            csv_path = self.root / "MSRVTT_JSFUSION_test.csv"
            for _, row in self._csv(csv_path, ("video_id", "sentence")):
                pairs.append((row["sentence"], video(row["video_id"].strip())))
        return videos, pairs

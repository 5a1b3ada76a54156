"""DiDeMo in the reference's layout, as paragraph-to-video retrieval.

``root/{split}_list.txt`` (video ids), ``root/{split}_data.json`` (a list of items with
``video``, ``description``, ``times``), videos in ``root/videos`` (or ``DiDeMo_Videos``,
root; option ``video_dir``). All descriptions of a video, in file order, are joined into
one paragraph; the whole video is sampled. One item per video.
"""
from __future__ import annotations

from nbretr.data._layout import lookup, read_id_list, read_json, video_dir
from nbretr.data.base import VideoRecord, VideoTextDataset
from nbretr.data.decoding import index_folder, strip_video_ext


class DiDeMo(VideoTextDataset):
    name = "didemo"

    def _read(self):
        vdir = video_dir(self, ("videos", "DiDeMo_Videos", "video"))
        index = index_folder(vdir)
        data_path = self.root / f"{self.split}_data.json"
        data = read_json(self, data_path) or []
        texts: dict[str, list[str]] = {}
        for k, item in enumerate(data):
            if not isinstance(item, dict) or not isinstance(item.get("video"), str) \
                    or not isinstance(item.get("description"), str):
                self._problem(data_path, f"[{k}]", f"malformed item {str(item)[:120]}")
                continue
            texts.setdefault(strip_video_ext(item["video"]), []).append(item["description"].strip())
        list_path = self.root / f"{self.split}_list.txt"
        videos, pairs = [], []
        for line, vid in read_id_list(self, list_path):
            if vid not in texts:
                self._problem(list_path, line, f"video {vid} has no description in {data_path.name}")
                continue
            path = lookup(index, vid)
            if path is None:
                self._problem(list_path, line, f"video {vid} not found in {vdir}")
                continue
            pairs.append((" ".join(texts[vid]), len(videos)))
            videos.append(VideoRecord(vid, path))
        return videos, pairs

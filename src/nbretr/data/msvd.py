"""MSVD in the reference's layout.

``root/{train,val,test}_list.txt`` (one video id a line), ``root/raw-captions.pkl`` (video
id -> list of token lists; a caption is its tokens joined by spaces), videos ``<id>.<ext>``
(.avi, .mp4, ...) in ``root/videos`` (or ``YouTubeClips``, ``MSVD_Videos``, root; option
``video_dir``). Every caption is an item; at test time every caption is a query
(``caption_to_video`` maps it to its video; ~40 captions a video).
"""
from __future__ import annotations

import pickle

from nbretr.data._layout import lookup, read_id_list, video_dir
from nbretr.data.base import VideoRecord, VideoTextDataset
from nbretr.data.decoding import index_folder


class MSVD(VideoTextDataset):
    name = "msvd"

    def _read(self):
        vdir = video_dir(self, ("videos", "YouTubeClips", "MSVD_Videos", "video"))
        index = index_folder(vdir)
        pkl = self.root / "raw-captions.pkl"
        if not pkl.is_file():
            raise FileNotFoundError(f"msvd: annotation file {pkl} does not exist")
        with open(pkl, "rb") as f:
            raw = pickle.load(f)
        list_path = self.root / f"{self.split}_list.txt"
        videos, pairs = [], []
        for line, vid in read_id_list(self, list_path):
            path = lookup(index, vid)
            if path is None:
                self._problem(list_path, line, f"video {vid} not found in {vdir}")
                continue
            caps = []
            for k, toks in enumerate(raw.get(vid, []) or []):
                if isinstance(toks, str):
                    caps.append(toks)
                elif isinstance(toks, (list, tuple)) and all(isinstance(t, str) for t in toks):
                    caps.append(" ".join(toks))
                else:
                    self._problem(pkl, f"{vid}[{k}]", f"malformed caption {str(toks)[:80]}")
            if not caps:
                self._problem(list_path, line, f"video {vid} has no caption in {pkl.name}")
                continue
            vi = len(videos)
            videos.append(VideoRecord(vid, path))
            pairs += [(c, vi) for c in caps]
        return videos, pairs

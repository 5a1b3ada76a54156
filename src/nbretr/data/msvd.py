"""MSVD in the reference's layout.

``root/{train,val,test}_list.txt`` (one video id a line), ``root/raw-captions.pkl`` (video
id -> list of token lists; a caption is its tokens joined by spaces), videos ``<id>.<ext>``
(.avi as downloaded, any extension; searched recursively, e.g. ``videos/YouTubeClips/``)
under ``root/videos`` (or ``YouTubeClips``, ``MSVD_Videos``, ``video``, root; option
``video_dir``). Every caption is an item, in list order then caption order (as the
reference); at test time every caption is a query (``caption_to_video`` maps it to its
video; ~40 captions a video). A repeated id in a list is added once (the reference's MSVD
loader adds it again: option ``repeated_ids="repeat"``).
"""
from __future__ import annotations

from nbretr.data._layout import first_occurrences, read_id_list, read_pickle
from nbretr.data.base import VideoTextDataset


class MSVD(VideoTextDataset):
    name = "msvd"

    def _read(self):
        index = self._video_index(("videos", "YouTubeClips", "MSVD_Videos", "video"), "<id>.avi")
        pkl = self.root / "raw-captions.pkl"
        raw = read_pickle(self, pkl, dict)
        list_path = self.root / f"{self.split}_list.txt"
        videos, pairs = [], []
        for line, vid in first_occurrences(self, read_id_list(self, list_path), key=str):
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
            videos.append(self._video(index, vid))
            pairs += [(c, vi) for c in caps]
        return videos, pairs

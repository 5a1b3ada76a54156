"""DiDeMo in the reference's layout, as paragraph-to-video retrieval.

``root/{split}_list.txt`` (video ids, one a line) and ``root/{split}_data.json`` (a list of
items with ``video``, ``description``, ``times``). DiDeMo names a video by its source file,
with the container's extension (``<flickr id>.mov``, ``.mp4``, ``.wmv``, ...); downloads
keep that name (``X.mov``) or add ``.mp4`` to it (``X.mov.mp4``, the AWS copy): both are
found, with or without the extension in the annotation, in any subfolder of ``root/videos``
(or ``DiDeMo_Videos``, ``video``, root; option ``video_dir``).

As the reference: the descriptions of a video are joined, in file order, into one paragraph;
videos come in the order of their first item in ``{split}_data.json``; a repeated id in the
list counts once; every video is sampled between seconds 0 and 31 (option
``didemo_window=(0, 31)``, both ends included, clipped to the video; ``None`` samples the
whole video). One item per video.
"""
from __future__ import annotations

import math

from nbretr.data._layout import first_occurrences, read_id_list, read_json
from nbretr.data.base import VideoTextDataset
from nbretr.data.decoding import strip_video_ext

# The reference samples every DiDeMo video from second 0 to second 31, both included
# (annotations cover the first 30 s; longer videos were truncated when annotated).
DIDEMO_WINDOW = (0, 31)


def window_bounds(window) -> tuple[float | None, float | None]:
    """``(start, end)`` for :func:`~nbretr.data.decoding.sample_indices` (``[start, end)``
    seconds) from a window of whole seconds ``(first, last)``, both included as in the
    reference; ``None`` / "whole": the whole video."""
    if window is None or window == "whole":
        return None, None
    try:
        first, last = (float(x) for x in window)
    except (TypeError, ValueError):
        raise ValueError(f"didemo_window must be (first, last) seconds or None, got {window!r}") from None
    if not (math.isfinite(first) and math.isfinite(last)) or first < 0 or last < first:
        raise ValueError(f"didemo_window must satisfy 0 <= first <= last, got {window!r}")
    return first, last + 1


class DiDeMo(VideoTextDataset):
    name = "didemo"

    def _read(self):
        start, end = window_bounds(self._options.get("didemo_window", DIDEMO_WINDOW))
        index = self._video_index(("videos", "DiDeMo_Videos", "video"), "<video> or <video>.mp4 (X.mov, X.mov.mp4)")
        list_path = self.root / f"{self.split}_list.txt"
        listed = first_occurrences(self, read_id_list(self, list_path))
        wanted = {strip_video_ext(vid): (line, vid) for line, vid in listed}
        data_path = self.root / f"{self.split}_data.json"
        data = read_json(self, data_path, list)
        texts: dict[str, list[str]] = {}  # first appearance in the JSON = the reference's order
        names: dict[str, str] = {}
        for k, item in enumerate(data):
            if not isinstance(item, dict) or not isinstance(item.get("video"), str) \
                    or not isinstance(item.get("description"), str):
                self._problem(data_path, f"[{k}]", f"malformed item {str(item)[:120]}")
                continue
            key = strip_video_ext(item["video"])
            if key in wanted:
                texts.setdefault(key, []).append(item["description"].strip())
                names.setdefault(key, item["video"])
        for key, (line, vid) in wanted.items():
            if key not in texts:
                self._problem(list_path, line, f"video {vid} has no description in {data_path.name}")
        videos, pairs = [], []
        for key, descriptions in texts.items():
            pairs.append((" ".join(descriptions), len(videos)))
            # look the file up under the JSON's name and the list's (both as written)
            rec = self._video(index, names[key], start=start, end=end)
            if rec.missing and wanted[key][1] != names[key]:
                alt = self._video(index, wanted[key][1], start=start, end=end)
                rec = alt if not alt.missing else rec
            videos.append(rec)
        return videos, pairs

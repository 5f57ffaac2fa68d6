"""Clips longer than one window: the windows' places on the shared time axis (``plan``), joining them
(``stitch``), writing them as they finish (``clip_writer``), generating them one after another, lip-sync and
soundtracks included (``generate``), and saving each for a resume (``window_files``)."""

from .clip_writer import ClipWriter
from .generate import (ClipResult, decode_windows, decoded_bytes, extend, generate_clip, window_meta,
                       write_windows)
from .plan import DEFAULT_OVERLAP_S, ClipPlan, Window, make_window, overlap_frames_for, plan_clip, window_seed
from .stitch import AudioSeams, equal_power_crossfade

__all__ = ["DEFAULT_OVERLAP_S", "AudioSeams", "ClipPlan", "ClipResult", "ClipWriter", "Window", "decode_windows",
           "decoded_bytes", "equal_power_crossfade", "extend", "generate_clip", "make_window",
           "overlap_frames_for", "plan_clip", "window_meta", "window_seed", "write_windows"]

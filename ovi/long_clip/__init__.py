"""Clips longer than one window: the windows' places on the shared time axis (``plan``)."""

from .plan import DEFAULT_OVERLAP_S, ClipPlan, Window, make_window, overlap_frames_for, plan_clip, window_seed

__all__ = ["DEFAULT_OVERLAP_S", "ClipPlan", "Window", "make_window", "overlap_frames_for", "plan_clip",
           "window_seed"]

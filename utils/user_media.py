"""The sampler's audio / video inputs: the user's media as a clip plan and the known track or frames, and the
windows sampled over them with ComfyUI's progress bar and previews.

Audio (lip-sync): the AUDIO becomes a 16 kHz mono track (``utils.media.audio_to_track``), the clip as long as
the track. Video (soundtrack): a VIDEO from core Load Video is read from its file by ``ovi.media.load_video``
(uint8 frames at 24 fps, each resized as it is read, so the source's frames are never all held at full size);
any other VIDEO through its components, an IMAGE batch at ``video_fps`` through ``utils.media.image_to_frames``;
then resized to the sampler's size (multiples of 32, ``ovi.media.fit_frames``, logged). A clip longer than one
window becomes a long clip (``ovi.long_clip``) whose windows share ``overlap`` seconds. Nothing here imports
torch or ComfyUI at module level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class UserMedia:
    plan: Any                  # ovi.long_clip.ClipPlan: the windows covering the media
    audio_track: Any = None    # lip-sync: float32 [N] 16 kHz, fitted to the plan
    video_frames: Any = None   # soundtrack: float32 [T, H, W, 3] in [0, 1] at 24 fps, fitted to the plan


def _file_of(video) -> str | None:
    """The path of a core Load Video VIDEO when it is a whole file (no trim window set on it), else None."""
    get = getattr(video, "get_stream_source", None)
    if get is None or type(video).__name__ != "VideoFromFile":
        return None
    trimmed = any(getattr(video, f"_VideoFromFile__{k}", 0) for k in ("start_time", "duration"))
    source = get()
    return source if isinstance(source, str) and not trimmed else None


def user_media(variant, *, audio=None, video=None, video_frames=None, video_fps: float = 24.0, image=None,
               size=None, overlap: float = 1.0, seed: int = 100) -> UserMedia | None:
    """The plan and known media of the sampler's inputs; None when none is connected (one plain window)."""
    from ..ovi import media
    from ..ovi.log import log
    from .media import audio_to_track, image_to_frames, video_to_frames

    given = [name for name, x in (("audio", audio), ("video", video), ("video_frames", video_frames)) if x is not None]
    if not given:
        return None
    if len(given) > 1:
        raise ValueError(f"connect one of audio (lip-sync), video or video_frames (soundtrack), not "
                         f"{' and '.join(given)}: audio makes the picture for a sound, video the sound for a picture.")
    if audio is not None:
        track = audio_to_track(audio)
        plan = media.plan_for_audio(variant, track, overlap=float(overlap), seed=int(seed))
        log.info("lip-sync: %.2f s of audio -> %d window%s", track.numel() / media.SAMPLE_RATE, plan.count,
                 "s" if plan.count > 1 else "")
        return UserMedia(plan, audio_track=media.fit_audio_to_plan(track, plan))
    if image is not None:
        raise ValueError("the video gives every frame, so a first-frame image has no place in a soundtrack: "
                         "disconnect image (or connect audio instead of video for lip-sync).")
    path = None if video is None else _file_of(video)
    if path is not None:
        frames, _ = media.load_video(path, size=size, variant=variant, resize=True)
    else:
        if video is not None:
            frames, _ = video_to_frames(video)
        else:
            if not video_fps or video_fps <= 0:
                raise ValueError(f"video_fps must be the frame rate of video_frames (> 0), got {video_fps}")
            frames = image_to_frames(video_frames, float(video_fps))
        frames, _ = media.fit_frames(frames, size, variant=variant)
    plan = media.plan_for_frames(variant, frames, overlap=float(overlap), seed=int(seed))
    log.info("soundtrack: %d frames at 24 fps (%dx%d) -> %d window%s", frames.shape[0], frames.shape[2],
             frames.shape[1], plan.count, "s" if plan.count > 1 else "")
    return UserMedia(plan, video_frames=media.frames_to_float(media.fit_frames_to_plan(frames, plan)))


def sample_windows(engine, prompt: str, chosen: UserMedia, *, image=None, size=None, steps: int, **generate_kw):
    """The windows of ``chosen.plan`` sampled (``ovi.long_clip.latent_windows.generate_windows``), with one
    ComfyUI progress bar over every window's steps and a latent preview per step."""
    from ..ovi.long_clip.latent_windows import generate_windows
    from .progress import latent_preview, progress_bar, should_stop

    n = chosen.plan.count
    total = n * int(steps)
    show = latent_preview(total)
    bar = progress_bar(total) if show is None else None
    kw = dict(generate_kw, steps=int(steps))
    if chosen.video_frames is None and size is not None:
        kw["size"] = size  # a soundtrack's size is its frames'
    return generate_windows(
        engine, prompt, plan=chosen.plan, image=image, audio_track=chosen.audio_track,
        video_frames=chosen.video_frames, should_stop=should_stop,
        progress=None if bar is None else (lambda w, _n, step, s: bar((w - 1) * s + step, n * s)),
        preview=None if show is None else (lambda w, _n, step, s, x0: show((w - 1) * s + step, n * s, x0)), **kw)

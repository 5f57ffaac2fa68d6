"""ComfyUI's progress bar and interrupt, bridged to the engine's ``progress(done, total)`` / ``should_stop()``.

The engine checks ``should_stop`` before every denoising step and every decoded latent frame, so the
interrupt button takes effect within one step. Every ``progress_bar`` update also checks the interrupt flag
itself: ComfyUI's progress hook raises on an interrupt too, but newer cores call the hook at most every
100 ms (and every 0.5 %), so a writer or converter driven by the bar would otherwise run on. Either way the
node ends with ComfyUI's own ``InterruptProcessingException`` (an ``Exception`` up to 0.3.x, a
``BaseException`` in newer cores, so the pack cleans up in ``finally`` / ``except BaseException``), which the UI
shows as "interrupted".
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator


def progress_bar(total: int) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback driving a ComfyUI progress bar on the running node; it raises
    ComfyUI's interrupt as soon as the flag is set, whether or not the (throttled) hook ran."""
    import comfy.model_management
    import comfy.utils

    bar = comfy.utils.ProgressBar(total)

    def update(done: int, total_now: int) -> None:
        bar.update_absolute(done, total_now)
        comfy.model_management.throw_exception_if_processing_interrupted()

    return update


def latent_preview(progress_total: int):
    """A ``preview(step, total, video_x0)`` callback that shows the step's clean-video estimate on the running
    node, through ComfyUI's own previewer for Wan2.2 latents (so the user's --preview-method and an installed
    TAEHV decoder apply); None when previews are off or this ComfyUI has no Wan2.2 latent format."""
    import comfy.latent_formats
    import comfy.model_management
    import comfy.utils
    import latent_preview

    fmt = getattr(comfy.latent_formats, "Wan22", None)
    if fmt is None:
        return None
    previewer = latent_preview.get_previewer(comfy.model_management.get_torch_device(), fmt())
    if previewer is None:
        return None
    bar = comfy.utils.ProgressBar(progress_total)

    def show(done: int, total: int, video_x0) -> None:
        # The middle latent frame: frame 0 of an I2AV run is the input image itself.
        frame = video_x0[:, video_x0.shape[1] // 2: video_x0.shape[1] // 2 + 1][None].float()
        bar.update_absolute(done, total, previewer.decode_latent_to_preview_image("JPEG", frame))

    return show


def should_stop() -> bool:
    import comfy.model_management

    return comfy.model_management.processing_interrupted()


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Turns the engine's ``Interrupted`` into ComfyUI's ``InterruptProcessingException``."""
    import comfy.model_management as mm

    from ..ovi.sampling.loop import Interrupted

    try:
        yield
    except Interrupted as e:
        from ..ovi.log import log

        log.info("stopped by ComfyUI's interrupt: %s", e)
        mm.throw_exception_if_processing_interrupted()  # clears the flag and raises
        raise mm.InterruptProcessingException() from e

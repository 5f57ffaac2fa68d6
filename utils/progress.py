"""ComfyUI's progress bar and interrupt, bridged to the engine's ``progress(done, total)`` / ``should_stop()``.

The engine checks ``should_stop`` before every denoising step and every decoded latent frame, so the
interrupt button takes effect within one step. ComfyUI's progress hook also raises on an interrupt; either
way the node ends with ComfyUI's own ``InterruptProcessingException``, which the UI shows as "interrupted".
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator


def progress_bar(total: int) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback driving a ComfyUI progress bar on the running node."""
    import comfy.utils

    bar = comfy.utils.ProgressBar(total)

    def update(done: int, total_now: int) -> None:
        bar.update_absolute(done, total_now)

    return update


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

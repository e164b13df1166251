"""Request images -> what the worker needs of them, before they are queued.

An image is decoded (under the image policy), reduced towards the model's input size and passed
through the processor's image preprocessing here, in the request's thread; a queued request holds only
the resulting ``PreparedImage`` (12 KB for the demo model's 32 x 32 input, 1.3 MB for LLaVA-1.5's
336 x 336), so the queue's memory is bounded by ``--queue-size`` times that, whatever was uploaded.
"""

from __future__ import annotations

import threading
from typing import Any

from m2pt_cli.answering import PreparedImage, prepare_image
from m2pt_cli.data.images import header_pixels
from m2pt_cli.serving.requests import ImagePolicy, decode_image, image_ref

LARGE_PIXELS = 1 << 20  # images over a megapixel are decoded one at a time


class ImagePreparer:
    """Decodes and prepares request images for ``loaded``; images over ``LARGE_PIXELS`` (from
    their header) ``concurrent`` at a time, since the decoded bitmap of a large image is the biggest
    allocation a request can cause (an 8192 x 8192 PNG of 110 KB decodes to 192 MiB)."""

    def __init__(self, loaded: Any, policy: ImagePolicy, concurrent: int = 1) -> None:
        from PIL import Image

        self.loaded = loaded
        self.policy = policy
        self._gate = threading.BoundedSemaphore(concurrent)
        probe = prepare_image(loaded.processor, loaded.backbone, Image.new("RGB", (64, 64)))
        height, width = probe.pixel_values.shape[-2:]
        self.fit = (int(width), int(height))  # the processor's input size

    def prepare(self, url: str, where: str) -> PreparedImage:
        """The image at ``url`` (a ``data:`` URI or an allowed local file) as the model will see it;
        ``ApiError`` naming ``where`` when it is refused."""
        ref = image_ref(url, where, self.policy)
        if header_pixels(ref, self.policy.max_pixels) <= LARGE_PIXELS:
            return self._prepare(ref, where)
        with self._gate:
            return self._prepare(ref, where)

    def _prepare(self, ref: dict[str, Any], where: str) -> PreparedImage:
        image = decode_image(ref, where, self.policy, self.fit)
        return prepare_image(self.loaded.processor, self.loaded.backbone, image)

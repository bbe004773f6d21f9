"""Errors the engine raises on purpose, each with a message meant for the artist."""


class EngineError(Exception):
    """Base class. ``permanent`` says whether retrying the same input can help."""

    permanent = True


class BadImage(EngineError):
    """The input is not an image we can protect (corrupt, animated, a bomb, too small...)."""


class ModelError(EngineError):
    """The model is missing, unsafe to load (pickle), or not a Stable Diffusion model."""


class UnsupportedDevice(EngineError):
    """The device or dtype that was asked for is not available on this machine."""


class OutOfMemory(EngineError):
    """The image did not fit in memory on this device.

    Not permanent by itself: another program may have held the memory. The
    daemon retries once, and fails the job for good if it runs out again.
    """

    permanent = False

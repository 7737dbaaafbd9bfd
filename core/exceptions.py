"""Every error `core` raises on purpose, as one tree (in the manner of httpx's ``_exceptions``).

Callers catch a branch, not a leaf: the gateway maps :class:`InputError` to a 4xx
``application/problem+json`` response, the CLI prints ``str(exc)`` and exits non-zero, and the
worker records ``type(exc).__name__`` and the message on the failed job.

    CamresError
    ├── InputError                      the caller's input is wrong (HTTP 4xx)
    │   ├── ImageError
    │   │   ├── ImageDecodeError        not an image, truncated or corrupt
    │   │   └── ImageTooLargeError      over the pixel limit (decompression bomb)
    │   ├── UnknownNameError            a registry lookup missed (also a KeyError)
    │   │   ├── UnknownArchitectureError
    │   │   ├── UnknownCamMethodError
    │   │   ├── UnknownFaultModelError
    │   │   └── UnknownClassError       a class name the model does not have
    │   ├── CheckpointError             not a checkpoint, pickled payload, inconsistent metadata
    │   ├── DatasetError                bad layout, too few classes, empty classes
    │   ├── DamageSpecError             a damage spec that does not fit the model
    │   └── UnsupportedModelError       e.g. CAM on a network without a GAP→fc head
    ├── WeightsUnavailableError         pretrained weights cannot be fetched (offline host)
    ├── RegistryError                   a programming error: duplicate registration
    └── CancelledError                  a long computation was asked to stop

Every exception may carry ``field``: the name of the argument or request field at fault, so an
API can point at it (``{"field": "damage.fraction", ...}``).
"""

from __future__ import annotations


class CamresError(Exception):
    """Base class of every error raised on purpose by camres."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message


class InputError(CamresError):
    """The caller's input is wrong; retrying the same input cannot succeed."""


class ImageError(InputError):
    """An image could not be used."""


class ImageDecodeError(ImageError):
    """The bytes are not a decodable image (non-image file, truncated or corrupt data)."""


class ImageTooLargeError(ImageError):
    """The image has more pixels than the configured limit (a decompression-bomb guard)."""


class UnknownNameError(InputError, KeyError):
    """A name is not in a registry. Also a ``KeyError`` so mapping-style callers still work."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.message


class UnknownArchitectureError(UnknownNameError):
    """No model builder is registered under that architecture name."""


class UnknownCamMethodError(UnknownNameError):
    """No CAM method is registered under that name."""


class UnknownFaultModelError(UnknownNameError):
    """No fault model is registered under that name."""


class UnknownClassError(UnknownNameError):
    """A class name that the model was not trained on."""


class CheckpointError(InputError):
    """A file is not a valid camres checkpoint, or its metadata contradicts its weights."""


class DatasetError(InputError):
    """A dataset folder or archive cannot be used (layout, class count, empty classes)."""


class DamageSpecError(InputError):
    """A damage specification does not fit the model it is applied to."""


class UnsupportedModelError(InputError):
    """The model cannot do what was asked (e.g. exact CAM needs a GAP→fc head)."""


class WeightsUnavailableError(CamresError):
    """Pretrained weights could not be obtained (no network, no local cache)."""


class RegistryError(CamresError):
    """A registry was misused by code: a duplicate name, or a bad registration."""


class CancelledError(CamresError):
    """A long computation stopped because its caller asked it to."""

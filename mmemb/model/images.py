"""Opening image files from data safely: the one place a path from a row becomes pixels.

What a hostile or unlucky row can hold, and what happens:

* **A path outside the image root** (absolute, ``../..``, or a link inside the root that
  points out of it): refused when a stage reads its artifact, before any compute, by
  ``data_contracts.io.validate`` (given ``image_root``; links resolved), naming the file,
  column and row, unless the run allows it explicitly (``allow_images_outside_root``,
  ``run.images.allow_outside_root``).
* **Something that is not a regular file** (a FIFO would block ``open`` forever, a device
  would stream without end, a folder cannot be decoded): :func:`open_image` checks with
  ``os.stat`` before opening, then opens non-blocking and checks the descriptor again.
* **A decompression bomb** (a 144 MP PNG decodes to ~430 MB of RGB before any resize):
  only the header is read first. JPEG is decoded reduced (``Image.draft``: DCT scaling by
  1/2, 1/4 or 1/8) and JPEG 2000 at a reduced resolution level, never below the size the
  caller needs; an image that would still decode to more than ``max_decode_pixels``
  (default :data:`DEFAULT_MAX_DECODE_PIXELS`) is refused with an :class:`ImageInputError`.
  After decoding, an image at least twice the needed size per side is box-reduced
  (``Image.reduce``) before the colour conversions and the final resize.
* **A truncated or corrupt file**: PIL's error, wrapped with the path ("fix or remove it").

Each problem is a :class:`ImageInputError` (a ``ValueError``), so per-row handlers (stage
2's error rows, stage 4/5's skipped rows, the evaluation's error rows) treat it like any
other unreadable image.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

#: Decoded pixels above which an image is refused (10000 x 10000: ~300 MB as RGB). PIL's
#: own bomb check only warns from 89 MP and fails from 179 MP.
DEFAULT_MAX_DECODE_PIXELS = 100_000_000

#: ``(width, height) -> (width, height)``: the size a caller will resize an image of the
#: given original size to (e.g. the processor grid's target), so decoding may stop there.
TargetFn = Callable[[int, int], tuple[int, int]]

#: Modes ``Image.reduce`` averages correctly (not palette indices, not bilevel).
_REDUCIBLE = ("L", "LA", "RGB", "RGBA", "CMYK", "I", "F")


class ImageInputError(ValueError):
    """An image a row names that cannot be used; the message names the path and the fix."""

    def __init__(self, path: str | Path, message: str, fix: str = "fix or remove it"):
        self.path = str(path)
        super().__init__(f"image {self.path!r} {message}; {fix}")


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISDIR, "a folder"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def regular_file(path: str | Path) -> None:
    """Refuse anything but a regular file (links are followed), without opening it."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ImageInputError(path, f"cannot be opened ({e.strerror or e})") from e
    if not stat.S_ISREG(st.st_mode):
        raise ImageInputError(path, f"is {_kind(st.st_mode)}, not a regular file",
                              "point the row at an image file")


def _open_regular(path: str | Path):
    """A binary file object of a regular file; a FIFO swapped in after the check is seen on
    the descriptor (opened non-blocking, so opening it cannot hang)."""
    regular_file(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ImageInputError(path, f"cannot be opened ({e.strerror or e})") from e
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ImageInputError(path, f"is {_kind(mode)}, not a regular file",
                              "point the row at an image file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _reduction(size: tuple[int, int], want: tuple[int, int]) -> int:
    """The largest integer factor that keeps both sides at or above ``want``."""
    return max(1, min(size[0] // max(1, want[0]), size[1] // max(1, want[1])))


def open_image(path: str | Path, *, max_decode_pixels: int | None = DEFAULT_MAX_DECODE_PIXELS,
               target: TargetFn | None = None, convert: Callable | None = None):
    """Decode an image file within the limits; returns ``(image, original_size, reduced)``.

    ``target``: the size the caller resizes to, given the original size; decoding is
    reduced (JPEG draft, JPEG 2000 resolution level), then box-reduced, to no less than
    it per side, and ``reduced`` says whether the image is now smaller than the file's.
    ``convert``: applied to the decoded image while the file is still open (animated
    formats read frames lazily). ``max_decode_pixels`` None: no limit but PIL's own.
    """
    import warnings

    from PIL import Image

    with _open_regular(path) as f, warnings.catch_warnings():
        if max_decode_pixels:  # this limit replaces PIL's warning (its error stays)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(f)
            size = img.size
            want = target(*size) if target is not None else None
            decoded = size
            if want is not None and _reduction(size, want) >= 2:
                if img.format == "JPEG":
                    img.draft(None, want)  # DCT scaling: the size stays >= want
                    decoded = img.size
                elif img.format == "JPEG2000":
                    n = min(5, _reduction(size, want).bit_length() - 1)  # 2**n <= factor
                    img.reduce = n  # decode resolution level n (the plugin's own knob)
                    decoded = tuple(-(-s // (1 << n)) for s in size)
            if max_decode_pixels and decoded[0] * decoded[1] > max_decode_pixels:
                raise ImageInputError(
                    path, f"is {size[0]}x{size[1]} ({size[0] * size[1] / 1e6:.1f} MP): "
                    f"decoding it takes {decoded[0] * decoded[1] / 1e6:.1f} MP, above the "
                    f"decode limit of {max_decode_pixels / 1e6:.1f} MP (max_decode_pixels)",
                    "shrink the image, or raise max_decode_pixels (run.images."
                    "max_decode_pixels) if the memory is there")
            img.load()
            if want is not None and not getattr(img, "is_animated", False):
                img = reduce_for(img, want)
            reduced = img.size != size
            if convert is not None:
                img = convert(img)
        except ImageInputError:
            raise
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
            raise ImageInputError(path, f"cannot be read ({type(e).__name__}: {e})") from e
    return img, size, reduced


def reduce_for(img, want: tuple[int, int] | None):
    """Box-reduce ``img`` by the largest integer factor that keeps it at least ``want``
    per side (a cheap first step before a high-quality resize); unchanged otherwise."""
    if want is None or img.mode not in _REDUCIBLE:
        return img
    f = _reduction(img.size, want)
    from PIL import Image

    # Image.reduce, not img.reduce: JPEG 2000 files shadow it with their decode level
    return Image.Image.reduce(img, f) if f >= 2 else img


class ImageCache:
    """A small LRU of images as the processor gets them (decoded, reduced, fitted to the
    grid), bounded in entries and in pixel bytes.

    Why: stage 2 embeds a query direct and with each of its K rationales, and the evaluation
    embeds a query in several modes; each of those prompts holds the same image, which
    without a cache is opened, decoded and resized K + 1 times. Callers key an entry by the
    file's identity (path, size, mtime) and the resolution settings, so a changed file or
    another resolution is a miss. Failures are not cached: an unreadable image raises each
    time, with its own message. Entries are shared, so callers must not modify them (the
    processor converts them to arrays; it does not).
    """

    def __init__(self, max_items: int = 1024, max_bytes: int = 256 << 20):
        from collections import OrderedDict

        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: OrderedDict = OrderedDict()  # key -> (image, bytes)
        self.bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key, make: Callable):
        """The cached image for ``key``, or ``make()``'s, kept if it fits the budget."""
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key][0]
        img = make()
        self.misses += 1
        size = img.width * img.height * len(img.getbands())  # bytes at 8 bits per band
        if self.max_items > 0 and size <= self.max_bytes:
            self._items[key] = (img, size)
            self.bytes += size
            while len(self._items) > self.max_items or self.bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self.bytes -= dropped
        return img

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0


def file_identity(path: str | Path) -> tuple | None:
    """``(path, size, mtime_ns)`` of an existing file (links followed), else None (the
    caller then opens it uncached, which raises the right :class:`ImageInputError`)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (str(path), st.st_size, st.st_mtime_ns)

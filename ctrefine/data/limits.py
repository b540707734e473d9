"""How large an image ctrefine reads, judged by its declared size before any pixel is read: a header
that claims a huge image (an 80-byte file "of" 32767^2 pixels) is refused instead of allocating gigabytes."""
from __future__ import annotations

import numpy as np

from ..errors import DataError

# A CT of 512 x 512 x 2048 (2 GiB in float32); a radiograph of 8192^2 (digital detectors are ~4300^2).
MAX_VOLUME_VOXELS = 512 * 512 * 2048
MAX_IMAGE_PIXELS = 8192 * 8192


def check_declared_size(path, shape, limit: int) -> None:
    """Refuse an image whose header declares more than ``limit`` elements (one line, naming the file)."""
    n = int(np.prod([int(d) for d in shape], dtype=np.int64)) if len(shape) else 0
    if n > limit:
        raise DataError(f"{path}: its header declares {' x '.join(map(str, shape))} = {n:,} values, more than the "
                        f"{limit:,} ctrefine reads (a damaged or hostile file?)")

"""Data sets in the formats the field uses, behind one entry point: `open_dataset(spec, ...)`.

Specs: a folder of images, a `.zip` (EDM layout), `cifar-10-python.tar.gz`, a `.npz`, an LMDB (LSUN),
`digits`, `toy:ring8`, `gmm:PATH.json`; options may follow '?': `mnist.npz?split=test`,
`toy:ring8?size=1000&seed=1`. The names are imported on first use (`diffdistill._lazy`).
"""

from .._lazy import install

__all__ = ["IMAGE_EXTENSIONS", "POINTS_LENGTH", "ImageDataset", "Source", "center_crop_resize",
           "edm_zip_name", "open_dataset", "open_source", "write_edm_zip"]

install(__name__, {**dict.fromkeys(["IMAGE_EXTENSIONS", "POINTS_LENGTH", "Source", "open_source"], ".formats"),
                   **dict.fromkeys(["ImageDataset", "center_crop_resize", "edm_zip_name", "open_dataset",
                                    "write_edm_zip"], ".images")})
del install

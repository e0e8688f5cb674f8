"""Datasets: the on-disk format, the loader training reads it with, the sources dataset_tool.py reads,
and the writer it builds datasets with.

- format.py: EDM's format (PNGs named `00000/img00000000.png`, 1000 per subfolder, in an
  uncompressed ZIP or a folder, with labels in `dataset.json`) and `DatasetError`, the error of the
  whole package, whose message says what is wrong and what to do.
- loader.py: `ImageFolderDataset`, a map-style dataset yielding (uint8 CHW image, one-hot label);
  it also reads datasets built by EDM's tool.
- source.py, sources.py: a `Source` yields `SourceItem`s decoded one at a time. `SOURCES` registers
  every `SourceKind` (folder.py: image folders and ZIPs; lsun.py; mnist.py; cifar10.py; embedded.py:
  `embedded:shapes|digits`); `open_source` recognises a --source by its content. A new kind of source
  is one module and one line in SOURCES.
- transforms.py, convert.py: channel conversion and crop/resize; `convert_dataset` streams a source
  through them into a dataset.
- writer.py: `dataset_writer` writes under a temporary name, syncs and renames into place, so a
  dataset is complete or absent.

`training/dataset.py` re-exports `ImageFolderDataset` and `DatasetError` for EDM-style imports.
"""

from training.datasets.convert import Summary, convert_dataset, validate_options
from training.datasets.format import (
    IMAGES_PER_FOLDER,
    LABELS_FILE,
    MAX_CLASSES,
    DatasetError,
    archive_name,
    image_array,
    is_image_name,
    labels_json,
    parse_labels_json,
)
from training.datasets.loader import ImageFolderDataset
from training.datasets.source import Source, SourceItem, SourceKind
from training.datasets.sources import SOURCES, detect_source, open_source
from training.datasets.transforms import CHANNELS, TRANSFORMS, parse_resolution
from training.datasets.writer import check_destination, dataset_writer, remove_stale_temporaries

__all__ = [
    "CHANNELS",
    "IMAGES_PER_FOLDER",
    "LABELS_FILE",
    "MAX_CLASSES",
    "SOURCES",
    "TRANSFORMS",
    "DatasetError",
    "ImageFolderDataset",
    "Source",
    "SourceItem",
    "SourceKind",
    "Summary",
    "archive_name",
    "check_destination",
    "convert_dataset",
    "dataset_writer",
    "detect_source",
    "image_array",
    "is_image_name",
    "labels_json",
    "open_source",
    "parse_labels_json",
    "parse_resolution",
    "remove_stale_temporaries",
    "validate_options",
]

"""Data sets (Karpathy JSON, JSONL), image loading and the miniature world."""

from genret.data.dataset import Dataset, DatasetError, ImageRecord, load_dataset
from genret.data.images import ImageLoadError, load_image

__all__ = ["Dataset", "DatasetError", "ImageLoadError", "ImageRecord", "load_dataset", "load_image"]

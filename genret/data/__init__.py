"""Data sets (Karpathy JSON, JSONL, CIR triplets: CIRR, CIRCO), image loading, and the annotations records carry."""

from genret.data.cir import CIRSet, Triplet, load_cir
from genret.data.dataset import Dataset, DatasetError, ImageRecord, load_dataset
from genret.data.images import ImageLoadError, load_image

__all__ = ["CIRSet", "Dataset", "DatasetError", "ImageLoadError", "ImageRecord", "Triplet", "load_cir", "load_dataset",
           "load_image"]

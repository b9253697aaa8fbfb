"""faiss-backed vector indexes and galleries."""

from genret.index.faiss_index import IndexMismatchError, VectorIndex
from genret.index.gallery import Gallery

__all__ = ["Gallery", "IndexMismatchError", "VectorIndex"]

"""repage: recover page numbers of image/OCR chunks in a Milvus + S3 RAG store."""

__version__ = "0.1.0"

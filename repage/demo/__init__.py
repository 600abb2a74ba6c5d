"""`repage demo`: build a realistic broken FLTR store from real Debian PDFs.

corpus.py fetches and cuts the documents, ingest.py replays the buggy pipeline,
embed.py is the offline embedding model, build.py writes the stores and the
ground truth.
"""

from repage.demo.build import GROUND_TRUTH, DemoSummary, build_demo, fresh_collection

__all__ = ["GROUND_TRUTH", "DemoSummary", "build_demo", "fresh_collection"]

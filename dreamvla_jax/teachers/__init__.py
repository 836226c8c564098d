"""Offline teacher runs (PyTorch via transformers, OpenCV tracking) that write the feature store.

Entry point: ``python -m dreamvla_jax.teachers --data DIR --out STORE`` (see ``__main__``); the logic is in
``precompute`` (store writing), ``models`` (SAM / DINOv2 / Depth-Anything) and ``tracking`` (LK / CoTracker).
torch is imported only by ``models`` (and CoTracker), never by the data pipeline.
"""

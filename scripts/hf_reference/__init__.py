"""Hugging Face reference outputs for the task pipelines, one module per task.

Each module exposes `record(models_dir) -> dict`, run by `scripts/record_hf_outputs.py` with torch and
transformers v4 installed; the test suite only reads the JSON files it writes.
"""

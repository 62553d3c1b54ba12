"""Tests of the task pipelines (sparseinfer/tasks) against recorded Hugging Face outputs."""

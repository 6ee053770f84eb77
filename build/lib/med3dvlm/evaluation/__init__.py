"""Evaluation runner: batched resumable generation, benchmark scoring, run-folder outputs."""

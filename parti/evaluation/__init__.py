"""Evaluation and reports: FID with Inception-v3, galleries, contact sheets and
per-category prompt reports."""

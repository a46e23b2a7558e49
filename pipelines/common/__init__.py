"""Machinery every job shares: flags and YAML (`cli`), encode options and the Ray Data
encoding stage (`encode_options`, `encode`), input files and chunks (`corpus_io`), file
ranges as Ray datasets (`ranges`), the output lease (`lease`), progress lines (`progress`).
"""

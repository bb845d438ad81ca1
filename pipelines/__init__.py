"""Runnable pipelines, each a module with ``run(argv)``: events, redrive, compact."""

"""The job contract between a caller (Slicer module, CLI, console) and the worker process.

A job is a folder holding ``job.json``; ``python -m medgen.worker JOB_DIR`` validates it, runs it,
streams JSON-lines events on stdout, writes outputs atomically under ``JOB_DIR/outputs`` and a
``manifest.json``, and exits with a code per outcome (:mod:`medgen.jobs.exit_codes`).
"""

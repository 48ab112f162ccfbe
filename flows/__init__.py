"""Prefect flows: the pipeline (:mod:`flows.pipeline`), one flow per stage
(``flows/<stage>.py``) and the ``mmemb`` command line (:mod:`flows.cli`)."""

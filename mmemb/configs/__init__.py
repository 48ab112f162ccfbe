"""One pydantic config per stage (one file each), the pipeline's config and its one loader
(:mod:`mmemb.configs.pipeline`), and the stage command lines generated from them
(:mod:`mmemb.configs.cli`)."""

from mmemb.configs.base import ConfigError, StageConfig

__all__ = ["ConfigError", "StageConfig"]

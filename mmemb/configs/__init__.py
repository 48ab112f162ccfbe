"""One pydantic config per stage (one file each) plus the pipeline's config."""

from mmemb.configs.base import ConfigError, StageConfig

__all__ = ["ConfigError", "StageConfig"]

"""The one exception type of the data layer.

`DataError` is a `config_lib.ConfigError` (hence a `ValueError`): every message names the setting at fault
(`config.data.files`, `config.train.seq_len`, ...) and says how to fix it, so a trainer that reports config errors
reports data errors the same way.
"""

from __future__ import annotations

from moe_jax.config import schema as config_lib


class DataError(config_lib.ConfigError):
    """Data cannot be prepared or read as configured. The message names the setting and the fix."""

"""The one exception the converters raise for a bad input (missing/unknown/mis-shaped keys, a truncated
file, an occupied output path): the library's CheckpointError (telechat2_ms/formats/errors.py) under the
converters' name. It is a ValueError, so callers that catch ValueError/ConfigError still work."""
from telechat2_ms.formats.errors import CheckpointError as ConversionError

__all__ = ["ConversionError"]

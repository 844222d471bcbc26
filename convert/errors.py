"""The one exception the converters raise for a bad input (missing/unknown/mis-shaped keys, a truncated
file, an occupied output path). It is a ValueError, so callers that catch ValueError/ConfigError still work."""


class ConversionError(ValueError):
    """A checkpoint or an output path cannot be converted; the message names the file or key and why."""

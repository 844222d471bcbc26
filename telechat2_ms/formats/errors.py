"""The one exception for a bad checkpoint or output path (missing / unknown / mis-shaped keys, a truncated
or unreadable file, an occupied output). A ValueError, so callers catching ValueError/ConfigError still work;
the converters raise it under the name `convert.errors.ConversionError`."""


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not match the model, or an output path is occupied; the
    message names the file or key and why."""

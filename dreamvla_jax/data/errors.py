"""The one exception type of the data room: a clear sentence naming the file, key or flag at fault."""


class DataError(ValueError):
    """Unreadable, missing or mismatched data. Command-line tools print the message and exit 2."""

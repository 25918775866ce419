"""The one exception type users see as a one-line message (the CLI prints it without a traceback)."""


class StreamPruneError(Exception):
    """A problem with the user's input or environment, phrased as what is wrong and what to do."""

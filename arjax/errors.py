"""The errors a user causes (bad config, missing data, unusable checkpoint, bad input files).

Command-line entry points print their one-line message and exit with status 2, without a
traceback; every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Expected failure caused by the input; the message says what is wrong and how to fix it."""

"""Errors that carry a sentence for the user instead of a traceback."""


class OrpolabError(Exception):
    """A problem with the user's input or environment, explained in its message.

    ``train.py`` prints these as one line (or records them on the job's MLflow run in a sweep)
    instead of a traceback: the message already says what is wrong and what to do.
    """

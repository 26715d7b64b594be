"""Exception types shared by the data loaders (a leaf module, so loaders can import it without cycles)."""


class DataError(ValueError):
    """A dataset file is missing or malformed."""

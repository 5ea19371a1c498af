"""User-facing errors: the CLI prints these as one line (no traceback unless --debug) and exits 1."""


class DiffdistillError(Exception):
    """An expected failure caused by input (a file, a spec, an option). Its message names what is wrong."""


class UsageError(DiffdistillError):
    """A wrong command-line usage; the CLI exits with code 2."""

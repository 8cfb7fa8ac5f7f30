"""The one exception type for bad input: the CLI prints its message as one line and exits with code 2."""


class UserError(Exception):
    """Bad input (config, CLI value, data file, run directory): say what is wrong and how to fix it."""


EXIT_USAGE = 2

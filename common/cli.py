"""What every command line of the project shares."""

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and every option's default in its help (none for required options and
    for defaults of None: they mean "not given")."""

    def _get_help_string(self, action):
        help_ = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS)  # False: a flag, off unless given
        if action.option_strings and not action.required and shown and "%(default)" not in help_:
            help_ += " (default: %(default)s)"
        return help_

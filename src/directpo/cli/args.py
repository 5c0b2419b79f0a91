"""What the CLI modules share: the help formatter. (A flag's type and range are its setting's:
`directpo.config.add_flags`; the output-file guard is `directpo.outputs.check_outputs`.)"""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, once: not when the help already says it, nor for None or on/off switches."""

    def _get_help_string(self, action):
        help_ = action.help or ""
        if "(default:" in help_ or action.default is None or isinstance(action.default, bool):
            return help_
        return super()._get_help_string(action)

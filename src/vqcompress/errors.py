"""Errors that are the user's to fix: the CLI prints them as one line, never a traceback."""


class VQCError(Exception):
    """A user mistake or bad input: shown as one readable line, exit code 2."""


class Unfit(VQCError):
    """A method cannot code this layer at this budget (a 3×3 depthwise kernel's 9 inputs that a
    codebook's d does not divide): the layer stays dense and is listed, unless it was asked for by
    name (``plan.Selection.settle``). A setting the user gave that a layer cannot take is a plain
    ``VQCError``."""

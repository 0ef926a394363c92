"""The one error type aquin_nb raises for bad input."""


class AquinError(Exception):
    """Raised when an input (file, tensor, shape, layer, prompt) is wrong.

    The message always names what was wrong and what was expected, e.g.
    ``AquinError("layer 14 is out of range: tiny-gpt2 has 4 layers (0-3)")``.
    The CLI turns it into one line on stderr and exit code 2.
    """

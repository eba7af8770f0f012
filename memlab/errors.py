"""The one root of every error memlab raises on purpose.

    MemlabError
    ├── InputError (also a ValueError): bad input, named with the reason
    │   before anything starts: a knob, a model, a hardware description, a
    │   size, a run folder. The CLI prints it as one line and exits 2.
    │   └── KnobError: a knob value refused (knob, value, reason); also
    │       memlab.KnobError and memlab.knobs.KnobError
    └── RunError (also a RuntimeError): a run that cannot start or go on for a
        reason of this machine or of the engine, not of the input (a stale op
        build lock, an unsupported DeepSpeed, a full storage region).

Each class keeps the standard base it had before this root existed
(ValueError, RuntimeError, OSError), so `except ValueError` still catches a
KnobError. Anything else that escapes memlab is a bug: the CLI lets it print
its traceback.
"""


class MemlabError(Exception):
    """An error memlab raises on purpose, with a message meant for people."""


class InputError(MemlabError, ValueError):
    """Bad input, refused before anything starts (the CLI exits 2)."""


class RunError(MemlabError, RuntimeError):
    """A run that cannot start or go on for a reason other than its input."""


class KnobError(InputError):
    """A knob value memlab refuses, with a one-line message: knob, value, reason."""

    def __init__(self, knob, value, reason):
        self.knob, self.value, self.reason = knob, value, reason
        shown = knob if isinstance(knob, str) and knob.isprintable() else repr(knob)
        super().__init__(f"{shown}={value!r}: {' '.join(str(reason).split())}")

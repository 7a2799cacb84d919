"""Python tooling of adapterdrop-serve: export Hugging Face / AdapterHub checkpoints to the
model repository format v1 (see models/README.md), plus an independent numpy reference."""


class ExportError(Exception):
    """Any error that makes an export impossible; the CLIs print it and exit non-zero."""

    kind = "ExportError"

    def __str__(self):
        return f"{self.kind}: {super().__str__()}"


class UnsupportedAdapter(ExportError):
    """The adapter/head uses a method or option this server cannot serve."""

    kind = "UnsupportedAdapter"


class MissingWeight(ExportError):
    """A weight the configuration requires is not in the checkpoint."""

    kind = "MissingWeight"


class InvalidCheckpoint(ExportError):
    """A checkpoint directory or manifest is malformed."""

    kind = "InvalidCheckpoint"

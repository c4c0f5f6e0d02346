"""The one exception type for a user's mistake (a bad recipe field, a missing file, an output that
already exists, a model the importer cannot express).

Every `bam` command ends a `UserError` with one line, `bam <command>: error: <message>`, and a
non-zero exit; any other exception is a bug and keeps its traceback. It subclasses `ValueError`
so callers (and tests) that catch `ValueError` keep working."""


class UserError(ValueError):
    """A refusal whose message names the file, key or field to fix."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist: refused like any UserError by `bam`, and
    still a FileNotFoundError for code that calls the library."""


class DiskFullError(UserError):
    """No space left on the device a run writes to. Not a recipe error: the run can be resumed
    from its last checkpoint (kept intact, see `write_atomically`) once space is freed."""

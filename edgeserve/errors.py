"""The exception tree of edgeserve.

Every failure a user can act on is an :class:`EdgeserveError` subclass whose message says what was
wrong and what was expected. One table here maps each class to a CLI exit code and an HTTP status;
the CLI and the HTTP servers use it instead of deciding on their own.

::

    EdgeserveError
    ├── ConfigError                      settings, CLI arguments
    │   ├── InUseError                   still used (a published version by a rollout, a device online)
    │   └── ProfileError                 a hardware profile file is broken
    │       └── UnknownProfileError      no profile of that name (lists close matches)
    ├── SchemaError                      a document (manifest, MQTT payload, report) is invalid
    │   └── ContractError                an MQTT topic or payload breaks the v1 contract
    ├── PackageError                     a .edgepkg cannot be trusted or read
    │   ├── CorruptPackageError          not a zip, truncated, unreadable member
    │   ├── UnsafeMemberError            path traversal, absolute paths, links, unexpected members
    │   ├── OversizeMemberError          larger than declared or than the configured limit (zip bomb)
    │   ├── TamperedFileError            a file's bytes do not match the manifest's sha256/size
    │   ├── TamperedManifestError        the manifest is not the one that was signed
    │   ├── SignatureError               signature missing, malformed or not valid
    │   │   └── UntrustedKeyError        signed, but by a key the reader does not pin
    │   ├── RollbackError                release number older than the installed one
    │   ├── DeltaError                   a delta is damaged, cut short, for another base, or
    │   │                                rebuilds other bytes than its target (download in full)
    │   └── VersionConflictError         that version is installed with different content
    ├── KeyFileError                     a key file is missing or not an ed25519 PEM key
    ├── ConversionError                  a model could not be converted or validated
    │   ├── UnsupportedOpError           the target lacks an op the model needs
    │   ├── ProfileLimitError            a profile limit (bytes, arena) cannot be met
    │   └── UnservedProfileError         a profile gets no artifact at all (nor a fallback)
    ├── ModelNotFoundError               unknown model or version
    ├── InvalidInputError                tensors with wrong names, shapes, dtypes or encodings
    │   └── TooLargeError                a request larger than the server will ever hold (413)
    ├── InferenceError                   the model's runtime failed on a well-formed request
    ├── RuntimeUnavailableError          the runtime cannot run here (e.g. Core ML off macOS)
    ├── CacheError                       the local model cache is damaged or full
    ├── TransferError                    a download or chunked transfer failed (resumes on retry)
    ├── OverloadedError                  bounded queue full: retry later
    ├── AuthError                        missing or bad credentials
    │   └── ForbiddenError               credentials valid, action not allowed
    ├── StoreError                       the fleet store cannot be used
    └── BrokerError                      the MQTT broker cannot be reached or refused us
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "BrokerError",
    "CacheError",
    "ConfigError",
    "ContractError",
    "ConversionError",
    "CorruptPackageError",
    "DeltaError",
    "EdgeserveError",
    "ForbiddenError",
    "InUseError",
    "InferenceError",
    "InvalidInputError",
    "KeyFileError",
    "ModelNotFoundError",
    "OverloadedError",
    "OversizeMemberError",
    "PackageError",
    "ProfileError",
    "ProfileLimitError",
    "RollbackError",
    "RuntimeUnavailableError",
    "SchemaError",
    "SignatureError",
    "StoreError",
    "TamperedFileError",
    "TamperedManifestError",
    "TooLargeError",
    "TransferError",
    "UnknownProfileError",
    "UnsafeMemberError",
    "UnservedProfileError",
    "UnsupportedOpError",
    "UntrustedKeyError",
    "VersionConflictError",
    "exit_code_for",
    "first_line",
    "http_status_for",
]


class EdgeserveError(Exception):
    """Root of every error edgeserve raises on purpose.

    ``exit_code`` is what the CLI exits with, ``http_status`` what the HTTP servers answer.
    """

    exit_code: int = 1
    http_status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(EdgeserveError):
    exit_code = 2
    http_status = 400


class InUseError(ConfigError):
    """Refused because something still uses it; the message names what, and how to free it."""

    http_status = 409


class ProfileError(ConfigError):
    pass


class UnknownProfileError(ProfileError):
    http_status = 404


class SchemaError(EdgeserveError):
    exit_code = 3
    http_status = 400


class ContractError(SchemaError):
    pass


class PackageError(EdgeserveError):
    exit_code = 4
    http_status = 422


class CorruptPackageError(PackageError):
    pass


class UnsafeMemberError(PackageError):
    pass


class OversizeMemberError(PackageError):
    pass


class TamperedFileError(PackageError):
    pass


class TamperedManifestError(PackageError):
    pass


class SignatureError(PackageError):
    pass


class UntrustedKeyError(SignatureError):
    pass


class RollbackError(PackageError):
    pass


class DeltaError(PackageError):
    pass


class VersionConflictError(PackageError):
    http_status = 409


class KeyFileError(EdgeserveError):
    exit_code = 2
    http_status = 400


class ConversionError(EdgeserveError):
    exit_code = 5
    http_status = 422


class UnsupportedOpError(ConversionError):
    pass


class ProfileLimitError(ConversionError):
    pass


class UnservedProfileError(ConversionError):
    """The conversion ran, but some profile got no artifact that passed (nor a fallback)."""

    exit_code = 16


class ModelNotFoundError(EdgeserveError):
    exit_code = 6
    http_status = 404


class InvalidInputError(EdgeserveError):
    exit_code = 7
    http_status = 400


class TooLargeError(InvalidInputError):
    """Too large to be taken at all (a busy server says :class:`OverloadedError` instead)."""

    http_status = 413


class InferenceError(EdgeserveError):
    exit_code = 15
    http_status = 500


class RuntimeUnavailableError(EdgeserveError):
    exit_code = 8
    http_status = 501


class CacheError(EdgeserveError):
    exit_code = 9
    http_status = 500


class TransferError(EdgeserveError):
    """``retryable``: a cut connection, a timeout, a busy server (the next attempt resumes);
    False when asking again cannot help (e.g. HTTP 404, a URL of the wrong scheme)."""

    exit_code = 13
    http_status = 502

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class OverloadedError(EdgeserveError):
    exit_code = 10
    http_status = 503

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class AuthError(EdgeserveError):
    exit_code = 11
    http_status = 401


class ForbiddenError(AuthError):
    http_status = 403


class StoreError(EdgeserveError):
    exit_code = 12
    http_status = 500


class BrokerError(EdgeserveError):
    exit_code = 14
    http_status = 502


def exit_code_for(exc: BaseException) -> int:
    """The CLI exit code for an exception (1 for anything that is not ours)."""
    return exc.exit_code if isinstance(exc, EdgeserveError) else 1


def http_status_for(exc: BaseException) -> int:
    """The HTTP status for an exception (500 for anything that is not ours)."""
    return exc.http_status if isinstance(exc, EdgeserveError) else 500


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (at most 500 characters), or its type's
    name when it has none: for a runtime's or library's error quoted inside one of ours."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:500]

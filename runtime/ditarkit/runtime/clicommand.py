"""The kit's click command class: an argument click cannot parse is one line and status 2,
like every other bad input, instead of click's usage block followed by the error."""

from __future__ import annotations

from typing import Any

import click


class OneLineUsageError(click.UsageError):
    """click's usage error (status 2) without a context, so it prints only its message."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ctx=None)


class OneLineCommand(click.Command):
    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as err:
            raise OneLineUsageError(f"{err.format_message()} (see {info_name or self.name} --help)") from None

"""Help that says what goes where: `INSTANCE`, not `{instance} <str>`; no `<bool>` after flags."""

from __future__ import annotations

from typing import Any

from typer.core import TyperCommand


class FriendlyCommand(TyperCommand):
    """A typer command whose help shows each parameter's metavar instead of its Python type."""

    def get_params(self, ctx: Any) -> list[Any]:
        params: list[Any] = super().get_params(ctx)
        for param in params:
            argument = param.param_type_name == "argument"
            flag = bool(getattr(param, "is_flag", False))
            if flag or param.metavar is not None:
                label = None if argument or flag else param.metavar
                param.display_type_rich = lambda ctx, label=label: label
            if argument and param.metavar:
                piece = param.metavar if param.required else f"[{param.metavar}]"
                param.get_usage_pieces = lambda ctx, piece=piece: [piece]
        return params

"""Command `review` (list, accept, reject), registered on `repage.cli.app`.

Thin like the rest of the CLI: settings, one call into repage.migration.review, print.
"""

from __future__ import annotations

from typing import Annotated

import typer

from repage.cli.common import JsonFlag, app, emit, out, run_command, settings_from
from repage.cli.render import render_review

review_app = typer.Typer(rich_markup_mode=None)
DocumentId = Annotated[str, typer.Argument(help="The document in review.", show_default=False)]


@review_app.callback(invoke_without_command=True)
def review(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List pdf-path page matches below the confidence threshold, with their evidence.

    Per chunk: the perceptual-hash distance, the margin to the next page, the candidate pages
    and the proposed page. Decide with `repage review accept ID` or `repage review reject ID`.

    Example: repage review --json
    """
    if ctx.invoked_subcommand is not None:
        return
    from repage.api import review_list

    run_command(lambda: emit(review_list(settings_from(ctx)), as_json, render_review(out)))


@review_app.command()
def accept(ctx: typer.Context, document_id: DocumentId, as_json: JsonFlag = False) -> None:
    """Accept the proposed pages of a document in review: the next `repage run` writes them.

    Example: repage review accept 5b1c0d2e-...
    """
    _decide(ctx, document_id, "accept", as_json)


@review_app.command()
def reject(ctx: typer.Context, document_id: DocumentId, as_json: JsonFlag = False) -> None:
    """Reject the match of a document in review: it is left to the reprocess path.

    Example: repage review reject 5b1c0d2e-...
    """
    _decide(ctx, document_id, "reject", as_json)


def _decide(ctx: typer.Context, document_id: str, decision: str, as_json: bool) -> None:
    from repage.api import review_decide

    def body():
        report = review_decide(settings_from(ctx), document_id, decision)
        emit(
            report,
            as_json,
            lambda r: out.print(
                f"{r['document_id']}: {r['decision']}, now {r['state']} on the {r['path']} path", markup=False
            ),
        )

    run_command(body)


app.add_typer(
    review_app,
    name="review",
    help=("Page matches below the confidence threshold: list them, accept or reject.\n\nExample: repage review --json"),
)

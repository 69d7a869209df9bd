//! The report in Markdown: the table, the grid and plot by reference (`grid.png`,
//! `loss.svg`, written beside it), definitions and provenance.

use std::fmt::Write as _;

use super::{ComparisonReport, DEFINITIONS, TABLE_HEADERS};

/// Escapes text for Markdown: no inline HTML (`<`, `&`).
fn text(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;")
}

/// Escapes text for a Markdown table cell.
fn cell(t: &str) -> String {
    text(t)
        .replace('\\', "\\\\")
        .replace('|', "\\|")
        .replace('\n', " ")
}

/// The page; `has_loss_plot`: whether `loss.svg` is written beside it.
pub fn render(report: &ComparisonReport, has_loss_plot: bool) -> String {
    let mut m = String::new();
    let _ = writeln!(m, "# {}\n", text(&report.title));
    let _ = writeln!(
        m,
        "Pipeline `{}` · {} · sdpipe {}\n",
        report.provenance.pipeline, report.provenance.created, report.provenance.sdpipe_version
    );
    let _ = writeln!(m, "## Methods compared\n");
    if report.concept.is_none() {
        let _ = writeln!(
            m,
            "No `concept` is set on the report stage, so subject and prompt fidelity are not measured.\n"
        );
    }
    let _ = writeln!(m, "| {} |", TABLE_HEADERS.join(" | "));
    let _ = writeln!(
        m,
        "|{}",
        TABLE_HEADERS
            .iter()
            .enumerate()
            .map(|(i, _)| if i < 2 { "---|" } else { "---:|" })
            .collect::<String>()
    );
    for row in report.table() {
        let cells: Vec<String> = row.cells().iter().map(|c| cell(c)).collect();
        let _ = writeln!(m, "| {} |", cells.join(" | "));
    }
    let _ = writeln!(m, "\n## Sample grid\n");
    let _ = writeln!(
        m,
        "Stage `{}`: rows {}; columns {}.\n",
        report.grid.stage,
        report.grid.rows.join(", "),
        report.grid.columns.join(" | ")
    );
    let _ = writeln!(m, "![sample grid](grid.png)\n");
    let _ = writeln!(m, "## Training loss\n");
    if has_loss_plot {
        let _ = writeln!(m, "![training loss of every method](loss.svg)\n");
    } else {
        let _ = writeln!(m, "No training stage among the report's inputs.\n");
    }
    let _ = writeln!(m, "## Definitions\n");
    for d in DEFINITIONS {
        let _ = writeln!(m, "- **{}**: {}", d.name, d.text);
    }
    let _ = writeln!(m, "\n## Provenance\n");
    for (label, value) in report.provenance_lines() {
        let _ = writeln!(m, "- {label}: `{value}`");
    }
    let _ = writeln!(m, "\n| Stage | Kind | Key | sdpipe |\n|---|---|---|---|");
    for s in &report.provenance.stages {
        let _ = writeln!(
            m,
            "| {} | {} | `{}` | {} |",
            cell(&s.name),
            cell(&s.kind),
            s.key,
            cell(&s.tool_version)
        );
    }
    m
}

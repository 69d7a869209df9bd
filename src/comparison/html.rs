//! The report as one self-contained HTML page: inline CSS, the grid as a `data:` URI, the
//! loss plot as inline SVG. It names no URL, so it opens the same with no network.

use std::fmt::Write as _;

use super::{ComparisonReport, DEFINITIONS, TABLE_HEADERS};

/// Escapes text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Standard base64 (RFC 4648, with padding).
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

const STYLE: &str = r#"
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px; padding: 0 1rem; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.7rem; margin-bottom: .2rem; }
h2 { font-size: 1.25rem; margin-top: 2.2rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; font-size: .9rem; margin: .6rem 0; }
th, td { border: 1px solid #d8d8d8; padding: .35rem .55rem; text-align: left; vertical-align: top; }
th { background: #f3f4f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.base td { background: #fafafa; color: #444; }
.grid img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }
.plot svg { max-width: 100%; height: auto; }
dl dt { font-weight: 600; margin-top: .5rem; }
dl dd { margin-left: 1.2rem; }
code { font-size: .85rem; background: #f3f4f6; padding: 0 .2rem; border-radius: 3px; }
details { margin: .4rem 0; }
"#;

/// The page. `grid_png`: the grid image; `loss_svg`: the plot (already without namespace).
pub fn render(report: &ComparisonReport, grid_png: &[u8], loss_svg: Option<&str>) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"generator\" content=\"sdpipe {}\">\n<title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n",
        escape(&report.provenance.sdpipe_version),
        escape(&report.title)
    );
    let _ = writeln!(h, "<h1>{}</h1>", escape(&report.title));
    let _ = writeln!(
        h,
        "<p class=\"sub\">Pipeline <code>{}</code> · {} · sdpipe {}</p>",
        escape(&report.provenance.pipeline),
        escape(&report.provenance.created),
        escape(&report.provenance.sdpipe_version)
    );

    // The table.
    let _ = writeln!(h, "<h2>Methods compared</h2>");
    if report.concept.is_none() {
        let _ = writeln!(
            h,
            "<p>No <code>concept</code> is set on the report stage, so subject and prompt fidelity are not measured.</p>"
        );
    }
    h.push_str("<table class=\"methods\">\n<thead><tr>");
    for header in TABLE_HEADERS {
        let _ = write!(h, "<th>{}</th>", escape(header));
    }
    h.push_str("</tr></thead>\n<tbody>\n");
    for (row, variant) in report.table().iter().zip(&report.variants) {
        let class = if variant.stage_kind.is_none() {
            " class=\"base\""
        } else {
            ""
        };
        let _ = write!(h, "<tr{class} data-variant=\"{}\">", escape(&row.variant));
        for (i, cell) in row.cells().iter().enumerate() {
            if i < 2 {
                let _ = write!(h, "<td>{}</td>", escape(cell));
            } else {
                let _ = write!(h, "<td class=\"num\">{}</td>", escape(cell));
            }
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</tbody>\n</table>\n");

    // The grid.
    let _ = writeln!(h, "<h2>Sample grid</h2>");
    let _ = writeln!(
        h,
        "<p>Stage <code>{}</code>: rows {}; columns {}. Same sampler, seeds and guidance for every row.</p>",
        escape(&report.grid.stage),
        escape(&report.grid.rows.join(", ")),
        escape(&report.grid.columns.join(" | "))
    );
    let _ = writeln!(
        h,
        "<div class=\"grid\"><img alt=\"sample grid: {}\" src=\"data:image/png;base64,{}\"></div>",
        escape(&report.grid.rows.join(", ")),
        base64(grid_png)
    );

    // Loss curves.
    let _ = writeln!(h, "<h2>Training loss</h2>");
    match loss_svg {
        Some(svg) => {
            let _ = writeln!(h, "<div class=\"plot\">{svg}</div>");
        }
        None => {
            let _ = writeln!(h, "<p>No training stage among the report's inputs.</p>");
        }
    }

    // Per-image scores.
    if report.concept.is_some() {
        let _ = writeln!(h, "<h2>Per-image fidelity</h2>");
        for v in &report.variants {
            let _ = writeln!(
                h,
                "<details><summary>{} ({} images)</summary>\n<table><thead><tr><th>Prompt</th><th>Seed</th><th>Image</th><th>Subject</th><th>Prompt fidelity</th></tr></thead><tbody>",
                escape(&v.name),
                v.images.len()
            );
            for img in &v.images {
                let f = |x: Option<f64>| x.map_or("—".to_string(), |x| format!("{x:.3}"));
                let _ = writeln!(
                    h,
                    "<tr><td>{}</td><td class=\"num\">{}</td><td><code>{}</code></td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                    escape(&img.prompt),
                    img.seed,
                    escape(&img.file),
                    f(img.subject),
                    f(img.prompt_fidelity)
                );
            }
            h.push_str("</tbody></table></details>\n");
        }
    }

    // Definitions.
    let _ = writeln!(h, "<h2>Definitions</h2>\n<dl>");
    for d in DEFINITIONS {
        let _ = writeln!(h, "<dt>{}</dt><dd>{}</dd>", escape(d.name), escape(d.text));
    }
    h.push_str("</dl>\n");

    // Provenance.
    let _ = writeln!(
        h,
        "<h2>Provenance</h2>\n<table class=\"provenance\"><tbody>"
    );
    for (label, value) in report.provenance_lines() {
        let _ = writeln!(
            h,
            "<tr><th>{}</th><td><code>{}</code></td></tr>",
            escape(&label),
            escape(&value)
        );
    }
    h.push_str("</tbody></table>\n");
    let _ = writeln!(
        h,
        "<table class=\"stages\"><thead><tr><th>Stage</th><th>Kind</th><th>Key</th><th>sdpipe</th></tr></thead><tbody>"
    );
    for s in &report.provenance.stages {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>",
            escape(&s.name),
            escape(&s.kind),
            escape(&s.key),
            escape(&s.tool_version)
        );
    }
    h.push_str("</tbody></table>\n</body>\n</html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected, "{input:?}");
        }
        assert_eq!(base64(&[0xff, 0xfe, 0xfd]), "//79");
    }

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(
            escape(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}

//! Labelled sample grids: rows are variants (base model, LoRA, DreamBooth, …), columns are
//! prompt/seed combinations; one PNG with a header row of column labels and a left column of
//! row labels, drawn with the bundled font.

use std::path::Path;

use image::{Rgb, RgbImage, imageops};

use super::RenderError;
use super::font::LabelFont;
use super::png_meta::write_png_atomic;

/// Look of a grid. `Default` gives white background, black text, sizes derived from the cells.
#[derive(Debug, Clone, PartialEq)]
pub struct GridStyle {
    /// Label text size in pixels; `None` = 6% of the cell width, clamped to 14..=40.
    pub font_size: Option<f32>,
    /// Width of the left label column in pixels; `None` = derived from cell width and font.
    pub label_width: Option<u32>,
    /// Space between cells, in pixels.
    pub gap: u32,
    /// Images smaller than this (largest side) are enlarged by an integer factor with
    /// nearest-neighbour sampling, so tiny test images still give a readable grid. 0 = never.
    pub min_cell_size: u32,
    /// Most lines a column label may take; longer labels end with "…".
    pub max_header_lines: usize,
    /// Background colour.
    pub background: [u8; 3],
    /// Text colour.
    pub text_color: [u8; 3],
    /// Fill of cells without an image (a failed variant).
    pub missing_color: [u8; 3],
    /// Optional text in the top-left corner (e.g. "variant \\ prompt, seed").
    pub corner_label: Option<String>,
}

impl Default for GridStyle {
    fn default() -> Self {
        Self {
            font_size: None,
            label_width: None,
            gap: 4,
            min_cell_size: 128,
            max_header_lines: 3,
            background: [255, 255, 255],
            text_color: [0, 0, 0],
            missing_color: [200, 200, 200],
            corner_label: None,
        }
    }
}

/// Where everything goes in a rendered grid (all in pixels).
#[derive(Debug, Clone, PartialEq)]
pub struct GridLayout {
    /// Size of one image cell (after any enlargement).
    pub cell_width: u32,
    /// Height of one image cell.
    pub cell_height: u32,
    /// Integer enlargement applied to the images.
    pub scale: u32,
    /// Label text size.
    pub font_size: f32,
    /// Width of the left label column.
    pub label_width: u32,
    /// Height of the header row.
    pub header_height: u32,
    /// Gap between cells.
    pub gap: u32,
    /// Total image width.
    pub width: u32,
    /// Total image height.
    pub height: u32,
    /// Wrapped lines of each column label.
    pub column_lines: Vec<Vec<String>>,
    /// Wrapped lines of each row label.
    pub row_lines: Vec<Vec<String>>,
}

impl GridLayout {
    /// Top-left corner of cell (`row`, `col`).
    pub fn cell_origin(&self, row: usize, col: usize) -> (u32, u32) {
        (
            self.label_width + self.gap + col as u32 * (self.cell_width + self.gap),
            self.header_height + self.gap + row as u32 * (self.cell_height + self.gap),
        )
    }
}

/// A grid of images with labels, built row by row.
#[derive(Debug, Clone, Default)]
pub struct SampleGrid {
    column_labels: Vec<String>,
    rows: Vec<(String, Vec<Option<RgbImage>>)>,
}

impl SampleGrid {
    /// An empty grid with these column labels (e.g. `"a photo of sks dog · seed 1"`).
    pub fn new<S: Into<String>>(column_labels: impl IntoIterator<Item = S>) -> Self {
        Self {
            column_labels: column_labels.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row: its label (the variant name) and one image per column (`None` for a cell
    /// that could not be produced; it is drawn as a grey "missing" cell).
    pub fn add_row(
        &mut self,
        label: impl Into<String>,
        images: Vec<Option<RgbImage>>,
    ) -> Result<(), RenderError> {
        let label = label.into();
        if images.len() != self.column_labels.len() {
            return Err(RenderError::Grid(format!(
                "row {label:?} has {} images but the grid has {} columns",
                images.len(),
                self.column_labels.len()
            )));
        }
        self.rows.push((label, images));
        Ok(())
    }

    /// Number of rows.
    pub fn num_rows(&self) -> usize {
        self.rows.len()
    }

    /// Number of columns.
    pub fn num_columns(&self) -> usize {
        self.column_labels.len()
    }

    /// Computes the layout for `style` without drawing.
    pub fn layout(&self, font: &LabelFont, style: &GridStyle) -> Result<GridLayout, RenderError> {
        if self.rows.is_empty() || self.column_labels.is_empty() {
            return Err(RenderError::Grid(format!(
                "a grid needs at least one row and one column (got {} × {})",
                self.rows.len(),
                self.column_labels.len()
            )));
        }
        let (mut w, mut h) = (0u32, 0u32);
        for (_, images) in &self.rows {
            for img in images.iter().flatten() {
                w = w.max(img.width());
                h = h.max(img.height());
            }
        }
        if w == 0 || h == 0 {
            // No image at all: cells of the minimum size, all "missing".
            w = style.min_cell_size.max(64);
            h = w;
        }
        let scale = if style.min_cell_size > 0 && w.max(h) < style.min_cell_size {
            style.min_cell_size.div_ceil(w.max(h))
        } else {
            1
        };
        let (cell_w, cell_h) = (w * scale, h * scale);
        let font_size = style
            .font_size
            .unwrap_or((cell_w as f32 * 0.06).clamp(14.0, 40.0));
        if !(font_size.is_finite() && font_size > 0.0) {
            return Err(RenderError::Grid(format!(
                "font size must be positive, got {font_size}"
            )));
        }
        let pad = (font_size * 0.4).ceil();
        let line_h = font.line_height(font_size);
        let label_width = style.label_width.unwrap_or_else(|| {
            ((cell_w as f32 * 0.6)
                .max(font_size * 8.0)
                .min(font_size * 16.0))
            .ceil() as u32
        });
        let column_lines: Vec<Vec<String>> = self
            .column_labels
            .iter()
            .map(|l| {
                font.wrap(
                    l,
                    font_size,
                    (cell_w as f32 - 2.0 * pad).max(font_size),
                    style.max_header_lines,
                )
            })
            .collect();
        let header_lines = column_lines.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let header_height = (header_lines as f32 * line_h + 2.0 * pad).ceil() as u32;
        let row_max_lines = (((cell_h as f32 - 2.0 * pad) / line_h).floor() as usize).max(1);
        let row_lines: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|(l, _)| {
                font.wrap(
                    l,
                    font_size,
                    (label_width as f32 - 2.0 * pad).max(font_size),
                    row_max_lines,
                )
            })
            .collect();
        let cols = self.column_labels.len() as u32;
        let rows = self.rows.len() as u32;
        let width = label_width + style.gap + cols * (cell_w + style.gap);
        let height = header_height + style.gap + rows * (cell_h + style.gap);
        Ok(GridLayout {
            cell_width: cell_w,
            cell_height: cell_h,
            scale,
            font_size,
            label_width,
            header_height,
            gap: style.gap,
            width,
            height,
            column_lines,
            row_lines,
        })
    }

    /// Draws the grid.
    pub fn render(&self, style: &GridStyle) -> Result<RgbImage, RenderError> {
        let font = LabelFont::bundled()?;
        let layout = self.layout(&font, style)?;
        let mut canvas = RgbImage::from_pixel(layout.width, layout.height, Rgb(style.background));
        let fs = layout.font_size;
        let line_h = font.line_height(fs);
        let pad = (fs * 0.4).ceil();

        // Header row: each column label centred over its column.
        for (c, lines) in layout.column_lines.iter().enumerate() {
            let (x0, _) = layout.cell_origin(0, c);
            let block_h = lines.len() as f32 * line_h;
            let top = ((layout.header_height as f32 - block_h) / 2.0).max(0.0);
            for (k, line) in lines.iter().enumerate() {
                let lw = font.text_width(line, fs);
                let x = x0 as f32 + ((layout.cell_width as f32 - lw) / 2.0).max(pad);
                font.draw(
                    &mut canvas,
                    line,
                    fs,
                    x,
                    top + k as f32 * line_h,
                    style.text_color,
                );
            }
        }
        if let Some(corner) = &style.corner_label {
            let lines = font.wrap(
                corner,
                fs,
                (layout.label_width as f32 - 2.0 * pad).max(fs),
                (((layout.header_height as f32 - 2.0 * pad) / line_h).floor() as usize).max(1),
            );
            for (k, line) in lines.iter().enumerate() {
                font.draw(
                    &mut canvas,
                    line,
                    fs,
                    pad,
                    pad + k as f32 * line_h,
                    style.text_color,
                );
            }
        }

        for (r, (_, images)) in self.rows.iter().enumerate() {
            // Row label, left-aligned and vertically centred on the row.
            let (_, y0) = layout.cell_origin(r, 0);
            let lines = &layout.row_lines[r];
            let block_h = lines.len() as f32 * line_h;
            let top = y0 as f32 + ((layout.cell_height as f32 - block_h) / 2.0).max(0.0);
            for (k, line) in lines.iter().enumerate() {
                font.draw(
                    &mut canvas,
                    line,
                    fs,
                    pad,
                    top + k as f32 * line_h,
                    style.text_color,
                );
            }
            for (c, img) in images.iter().enumerate() {
                let (x, y) = layout.cell_origin(r, c);
                match img {
                    Some(img) => {
                        let scaled;
                        let img = if layout.scale > 1 {
                            scaled = imageops::resize(
                                img,
                                img.width() * layout.scale,
                                img.height() * layout.scale,
                                imageops::FilterType::Nearest,
                            );
                            &scaled
                        } else {
                            img
                        };
                        // Centre images smaller than the cell.
                        let ox = x + (layout.cell_width - img.width()) / 2;
                        let oy = y + (layout.cell_height - img.height()) / 2;
                        imageops::replace(&mut canvas, img, ox as i64, oy as i64);
                    }
                    None => {
                        for yy in y..y + layout.cell_height {
                            for xx in x..x + layout.cell_width {
                                canvas.put_pixel(xx, yy, Rgb(style.missing_color));
                            }
                        }
                        let text = font.ellipsize("missing", fs, layout.cell_width as f32);
                        let tw = font.text_width(&text, fs);
                        font.draw(
                            &mut canvas,
                            &text,
                            fs,
                            x as f32 + ((layout.cell_width as f32 - tw) / 2.0).max(0.0),
                            y as f32 + ((layout.cell_height as f32 - line_h) / 2.0).max(0.0),
                            style.text_color,
                        );
                    }
                }
            }
        }
        Ok(canvas)
    }

    /// Renders the grid and writes it as a PNG atomically (temp file + rename), with a
    /// `Description` text chunk listing the rows and columns.
    pub fn save(&self, path: impl AsRef<Path>, style: &GridStyle) -> Result<RgbImage, RenderError> {
        let img = self.render(style)?;
        let description = format!(
            "rows: {}\ncolumns: {}",
            self.rows
                .iter()
                .map(|(l, _)| l.as_str())
                .collect::<Vec<_>>()
                .join(" | "),
            self.column_labels.join(" | ")
        );
        write_png_atomic(
            path.as_ref(),
            &img,
            &[("Description", description.as_str())],
        )?;
        Ok(img)
    }
}

//! Sample grids and A1111 `parameters` PNG metadata.

use image::{Rgb, RgbImage};
use sdpipe::render::font::{ELLIPSIS, LabelFont};
use sdpipe::render::png_meta::{PARAMETERS_KEY, encode_png, read_png_text_bytes};
use sdpipe::render::{
    GenerationParameters, GridStyle, RenderError, SampleGrid, read_parameters, read_png_text,
    rgb_image_from_chw, write_png_with_parameters,
};

fn params() -> GenerationParameters {
    GenerationParameters {
        prompt: "a photo of sks dog".into(),
        negative_prompt: "blurry, lowres".into(),
        steps: 20,
        sampler: "Euler a".into(),
        cfg_scale: 7.0,
        seed: 1,
        width: 512,
        height: 512,
        model_hash: Some("abcdef1234".into()),
        model: Some("name".into()),
        extra: vec![],
    }
}

fn gradient(w: u32, h: u32, seed: u8) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            (x * 255 / w.max(1)) as u8,
            (y * 255 / h.max(1)) as u8,
            seed.wrapping_mul(40),
        ])
    })
}

#[test]
fn infotext_has_a1111_format() {
    assert_eq!(
        params().to_infotext(),
        "a photo of sks dog\nNegative prompt: blurry, lowres\nSteps: 20, Sampler: Euler a, \
         CFG scale: 7, Seed: 1, Size: 512x512, Model hash: abcdef1234, Model: name"
    );
    let mut p = params();
    p.negative_prompt.clear();
    p.cfg_scale = 7.5;
    p.model = Some("my, model".into());
    p.model_hash = None;
    p.extra = vec![("Clip skip".into(), "2".into())];
    assert_eq!(
        p.to_infotext(),
        "a photo of sks dog\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 1, \
         Size: 512x512, Model: \"my, model\", Clip skip: 2"
    );
    assert_eq!(
        GenerationParameters::parse_infotext(&p.to_infotext()).unwrap(),
        p
    );
}

#[test]
fn parses_real_a1111_text() {
    let text = "masterpiece, 1girl, <lora:style:0.8>\nwith a second line\nNegative prompt: bad hands\n\
                Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 3141592653, \
                Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, \
                Lora hashes: \"style: 0123456789ab\", Version: v1.7.0";
    let p = GenerationParameters::parse_infotext(text).unwrap();
    assert_eq!(
        p.prompt,
        "masterpiece, 1girl, <lora:style:0.8>\nwith a second line"
    );
    assert_eq!(p.negative_prompt, "bad hands");
    assert_eq!(
        (p.steps, p.seed, p.width, p.height),
        (28, 3141592653, 512, 768)
    );
    assert_eq!(p.sampler, "DPM++ 2M Karras");
    assert_eq!(p.cfg_scale, 6.5);
    assert_eq!(p.model_hash.as_deref(), Some("6ce0161689"));
    assert_eq!(p.model.as_deref(), Some("v1-5-pruned-emaonly"));
    assert_eq!(
        p.extra,
        vec![
            ("Lora hashes".to_string(), "style: 0123456789ab".to_string()),
            ("Version".to_string(), "v1.7.0".to_string())
        ]
    );
    assert!(matches!(
        GenerationParameters::parse_infotext("just a prompt"),
        Err(RenderError::Parameters(_))
    ));
}

#[test]
fn parameters_chunk_round_trips_through_a_png_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sample.png");
    let img = gradient(24, 16, 3);
    for p in [
        params(),
        GenerationParameters {
            prompt: "東京タワー 夜景, ünïcödé".into(),
            negative_prompt: String::new(),
            ..params()
        },
    ] {
        write_png_with_parameters(&path, &img, &p).unwrap();
        assert_eq!(read_parameters(&path).unwrap(), Some(p.clone()));
        let chunks = read_png_text(&path).unwrap();
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].0, PARAMETERS_KEY);
        assert_eq!(chunks[0].1, p.to_infotext());
        let back = image::open(&path).unwrap().to_rgb8();
        assert_eq!(back, img);
    }
    // Atomic write: only the final file is left in the directory.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["sample.png".to_string()]);
    // A PNG without the chunk has no parameters.
    let plain = dir.path().join("plain.png");
    std::fs::write(&plain, encode_png(&img, &[]).unwrap()).unwrap();
    assert_eq!(read_parameters(&plain).unwrap(), None);
    // Writing into a missing directory names the path.
    let err =
        write_png_with_parameters(dir.path().join("no/such/x.png"), &img, &params()).unwrap_err();
    assert!(err.to_string().contains("no/such"), "{err}");
    assert!(read_png_text_bytes(b"not a png").is_err());
}

fn dark_pixels(img: &RgbImage, x0: u32, y0: u32, x1: u32, y1: u32) -> usize {
    let mut n = 0;
    for y in y0..y1 {
        for x in x0..x1 {
            let p = img.get_pixel(x, y).0;
            if (p[0] as u32 + p[1] as u32 + p[2] as u32) < 3 * 128 {
                n += 1;
            }
        }
    }
    n
}

#[test]
fn grid_has_expected_size_and_labels() {
    let (w, h) = (64u32, 48u32);
    let cols = [
        "a photo of sks dog · seed 1",
        "seed 2",
        &"a very long prompt ".repeat(20),
    ];
    let mut grid = SampleGrid::new(cols.iter().map(|s| s.to_string()));
    grid.add_row("base", (0..3).map(|c| Some(gradient(w, h, c))).collect())
        .unwrap();
    grid.add_row(
        "lora rank 16 with a long variant name that must wrap or be shortened",
        vec![Some(gradient(w, h, 5)), None, Some(gradient(w, h, 6))],
    )
    .unwrap();
    let style = GridStyle {
        font_size: Some(14.0),
        label_width: Some(100),
        gap: 4,
        min_cell_size: 0,
        ..GridStyle::default()
    };
    let font = LabelFont::bundled().unwrap();
    let layout = grid.layout(&font, &style).unwrap();
    let img = grid.render(&style).unwrap();
    assert_eq!(
        (layout.cell_width, layout.cell_height, layout.scale),
        (64, 48, 1)
    );
    assert_eq!(img.width(), 100 + 4 + 3 * (64 + 4));
    assert_eq!(img.height(), layout.header_height + 4 + 2 * (48 + 4));
    assert_eq!((img.width(), img.height()), (layout.width, layout.height));
    assert!(layout.header_height as f32 >= font.line_height(14.0));

    // Long labels wrap within their box and are shortened with an ellipsis.
    let long = &layout.column_lines[2];
    assert!(
        long.len() <= style.max_header_lines && long.len() > 1,
        "{long:?}"
    );
    assert!(long.last().unwrap().ends_with(ELLIPSIS), "{long:?}");
    for line in layout
        .column_lines
        .iter()
        .chain(&layout.row_lines)
        .flatten()
    {
        assert!(font.text_width(line, 14.0) <= 100.0, "{line:?} too wide");
    }
    assert!(layout.row_lines[1].len() >= 2, "{:?}", layout.row_lines[1]);

    // Every column label and every row label put ink in its area.
    for c in 0..3 {
        let (x, _) = layout.cell_origin(0, c);
        let ink = dark_pixels(&img, x, 0, x + layout.cell_width, layout.header_height);
        assert!(ink > 10, "column {c} label is blank ({ink} dark pixels)");
    }
    for r in 0..2 {
        let (_, y) = layout.cell_origin(r, 0);
        let ink = dark_pixels(&img, 0, y, layout.label_width, y + layout.cell_height);
        assert!(ink > 10, "row {r} label is blank ({ink} dark pixels)");
    }
    // Images land in their cells; the missing cell is grey.
    let (x, y) = layout.cell_origin(1, 2);
    assert_eq!(
        img.get_pixel(x + 10, y + 20),
        gradient(w, h, 6).get_pixel(10, 20)
    );
    let (x, y) = layout.cell_origin(1, 1);
    assert_eq!(img.get_pixel(x + 1, y + 1).0, style.missing_color);
}

#[test]
fn tiny_images_are_enlarged_and_grid_saves() {
    let mut grid = SampleGrid::new(["seed 1", "seed 2"]);
    grid.add_row(
        "base",
        vec![Some(gradient(16, 16, 1)), Some(gradient(16, 16, 2))],
    )
    .unwrap();
    let style = GridStyle::default();
    let layout = grid.layout(&LabelFont::bundled().unwrap(), &style).unwrap();
    assert_eq!(layout.scale, 8);
    assert_eq!(layout.cell_width, 128);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grid.png");
    let img = grid.save(&path, &style).unwrap();
    let back = image::open(&path).unwrap().to_rgb8();
    assert_eq!(back, img);
    assert_eq!((back.width(), back.height()), (layout.width, layout.height));
    let text = read_png_text(&path).unwrap();
    assert_eq!(text[0].0, "Description");
    assert!(text[0].1.contains("seed 2"));

    assert!(matches!(
        grid.add_row("bad", vec![None]),
        Err(RenderError::Grid(_))
    ));
    assert!(SampleGrid::new(["x"]).render(&style).is_err());
}

#[test]
fn chw_floats_convert_like_diffusers() {
    // 1x2 image: pixel 0 = (0, 0.5, 1), pixel 1 = (0.25, 2.0 → clamped, -1 → clamped)
    let data = [0.0, 0.25, 0.5, 2.0, 1.0, -1.0];
    let img = rgb_image_from_chw(&data, 1, 2).unwrap();
    assert_eq!(img.get_pixel(0, 0).0, [0, 128, 255]);
    assert_eq!(img.get_pixel(1, 0).0, [64, 255, 0]);
    assert!(rgb_image_from_chw(&data, 2, 2).is_err());
}

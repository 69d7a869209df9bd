//! Textual-inversion embeddings from the A1111 and diffusers files, inserted into the text
//! encoder through the txt2img pipeline, against transformers (goldens/textual_inversion).

use std::path::Path;

use dfdx::prelude::*;
use sdpipe::diffusion::Checkpoint;
use sdpipe::diffusion::text_to_image::TextToImage;
use sdpipe::formats::embedding::read_embedding;
use sdpipe::formats::read_safetensors;

fn fixtures() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
}

#[test]
fn embeddings_from_a1111_and_diffusers_files_match_transformers() {
    let golden = read_safetensors(&fixtures().join("goldens/textual_inversion.safetensors"))
        .unwrap()
        .tensors;
    let dev = Cpu::default();
    let ckpt = Checkpoint::open(fixtures().join("tiny-sd")).unwrap();
    // The fixture copy of tiny-sd has no tokenizer folder: the bundled CLIP tokenizer is used.
    let base = TextToImage::load(&ckpt, None, &dev).unwrap();
    let cases = [
        (
            "ti_sks_a1111.safetensors",
            Some("<sks>"),
            "a photo of <sks>",
            "sks.last_hidden_state",
        ),
        (
            "ti_sks_diffusers.safetensors",
            None,
            "a photo of <sks>",
            "sks.last_hidden_state",
        ),
        (
            "ti_cat_toy_diffusers.safetensors",
            None,
            "a <cat-toy> on a table",
            "cat_toy.last_hidden_state",
        ),
    ];
    let mut worst = 0.0f32;
    for (file, token, prompt, key) in cases {
        let mut pipe = base.clone();
        let (emb, _) =
            read_embedding(&fixtures().join("textual_inversion").join(file), token).unwrap();
        pipe.add_embedding(&emb.token, &emb.vectors.data).unwrap();
        let states = pipe.encode_prompt(prompt, 0).unwrap().as_vec();
        let expected = &golden[key].data;
        let err = states
            .iter()
            .zip(expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err <= 1e-4, "{file}: max error {err}");
        worst = worst.max(err);
    }
    println!("max abs error over 3 embedding files: {worst:e}");

    // A token that is already one word of the vocabulary is refused.
    let mut pipe = base.clone();
    let (emb, _) = read_embedding(
        &fixtures().join("textual_inversion/ti_sks_a1111.safetensors"),
        Some("dog"),
    )
    .unwrap();
    assert!(pipe.add_embedding(&emb.token, &emb.vectors.data).is_err());
}

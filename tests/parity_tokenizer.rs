//! Token ids must equal the `tokenizers`/transformers reference exactly on every case of
//! `tests/fixtures/tokenizer_cases.json`, from `tokenizer.json`, from the diffusers
//! `vocab.json` + `merges.txt` folder and from the bundled copy.

use std::path::PathBuf;

use sdpipe::diffusion::tokenizer::{ClipTokenizer, TokenizerError};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Case {
    prompt: String,
    input_ids: Vec<u32>,
    attention_mask: Vec<u32>,
    ids_untruncated: Vec<u32>,
    tokens_untruncated: Vec<String>,
    truncated: bool,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixtures().join("tokenizer_cases.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            prompt: c["prompt"].as_str().unwrap().to_string(),
            input_ids: ids(&c["input_ids"]),
            attention_mask: ids(&c["attention_mask"]),
            ids_untruncated: ids(&c["ids_untruncated"]),
            tokens_untruncated: c["tokens_untruncated"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().to_string())
                .collect(),
            truncated: c["truncated"].as_bool().unwrap(),
        })
        .collect()
}

fn check_all(tok: &ClipTokenizer, name: &str) {
    let cases = cases();
    assert_eq!(cases.len(), 23, "fixture case count");
    let mut mismatches = Vec::new();
    for case in &cases {
        let untrunc = tok.encode_untruncated(&case.prompt).unwrap();
        let enc = tok.encode(&case.prompt).unwrap();
        if untrunc != case.ids_untruncated {
            mismatches.push(format!(
                "{name}: untruncated ids of {:?}\n  got  {untrunc:?}\n  want {:?}",
                case.prompt, case.ids_untruncated
            ));
        }
        if enc.input_ids != case.input_ids {
            mismatches.push(format!(
                "{name}: input_ids of {:?}\n  got  {:?}\n  want {:?}",
                case.prompt, enc.input_ids, case.input_ids
            ));
        }
        if enc.attention_mask != case.attention_mask {
            mismatches.push(format!("{name}: attention mask of {:?}", case.prompt));
        }
        if enc.truncated() != case.truncated {
            mismatches.push(format!(
                "{name}: truncated flag of {:?}: got {}",
                case.prompt,
                enc.truncated()
            ));
        }
        let expected_dropped = case.ids_untruncated.len().saturating_sub(77);
        if enc.dropped_tokens != expected_dropped
            || enc.num_tokens_untruncated != case.ids_untruncated.len()
        {
            mismatches.push(format!(
                "{name}: dropped count of {:?}: got {} want {expected_dropped}",
                case.prompt, enc.dropped_tokens
            ));
        }
        let tokens = tok.tokens(&case.prompt).unwrap();
        if tokens != case.tokens_untruncated {
            mismatches.push(format!("{name}: token strings of {:?}", case.prompt));
        }
    }
    println!(
        "{name}: {} cases, {} mismatches",
        cases.len(),
        mismatches.len()
    );
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn tokenizer_json_matches_reference() {
    let tok =
        ClipTokenizer::from_tokenizer_json(fixtures().join("../../assets/clip/tokenizer.json"))
            .unwrap();
    assert_eq!(tok.vocab_size(), 49408);
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id()),
        (49406, 49407, 49407)
    );
    check_all(&tok, "tokenizer.json");
}

#[test]
fn vocab_merges_folder_matches_reference() {
    let tok = ClipTokenizer::from_dir(fixtures().join("tiny-sd/tokenizer")).unwrap();
    assert_eq!(tok.vocab_size(), 49408);
    assert_eq!(tok.max_length(), 77);
    check_all(&tok, "vocab.json+merges.txt");
}

#[test]
fn bundled_matches_reference() {
    let tok = ClipTokenizer::bundled().unwrap();
    check_all(&tok, "bundled");
}

#[test]
fn known_ids_and_truncation_count() {
    let tok = ClipTokenizer::bundled().unwrap();
    let enc = tok.encode("a photo of sks dog").unwrap();
    assert_eq!(
        &enc.input_ids[..8],
        &[49406, 320, 1125, 539, 48136, 1929, 49407, 49407]
    );
    assert_eq!(enc.dropped_tokens, 0);
    let long = "word ".repeat(100);
    let enc = tok.encode(&long).unwrap();
    assert_eq!(enc.input_ids.len(), 77);
    assert_eq!(enc.dropped_tokens, 25);
    assert_eq!(enc.input_ids[76], 49407);
    let short = tok.clone().with_max_length(10).unwrap();
    let enc = short
        .encode("a photo of sks dog on the beach at sunset")
        .unwrap();
    assert_eq!(enc.input_ids.len(), 10);
    assert_eq!(enc.dropped_tokens, 2);
}

#[test]
fn placeholder_tokens_follow_diffusers_textual_inversion() {
    // README §5: `<sks>` with 2 vectors → ids 49408, 49409; `<cat-toy>` single vector.
    for mut tok in [
        ClipTokenizer::bundled().unwrap(),
        ClipTokenizer::from_dir(fixtures().join("tiny-sd/tokenizer")).unwrap(),
    ] {
        let ids = tok.add_placeholder("<sks>", 2).unwrap();
        assert_eq!(ids, vec![49408, 49409]);
        let enc = tok.encode("a photo of <sks>").unwrap();
        assert_eq!(
            &enc.input_ids[..8],
            &[49406, 320, 1125, 539, 49408, 49409, 49407, 49407]
        );
        assert_eq!(tok.vocab_size(), 49410);

        let mut tok2 = ClipTokenizer::bundled().unwrap();
        assert_eq!(tok2.add_placeholder("<cat-toy>", 1).unwrap(), vec![49408]);
        let enc = tok2.encode("a <cat-toy> on a table").unwrap();
        assert_eq!(
            &enc.input_ids[..8],
            &[49406, 320, 49408, 525, 320, 2175, 49407, 49407]
        );
        // Existing single tokens are refused.
        for existing in ["sks", "dog", "DOG", "<|endoftext|>", "<sks>"] {
            match tok.add_tokens(&[existing]) {
                Err(TokenizerError::TokenExists { .. }) => {}
                other => panic!("{existing}: expected TokenExists, got {other:?}"),
            }
        }
        assert!(matches!(
            tok.add_tokens(&["two words"]),
            Err(TokenizerError::InvalidToken { .. })
        ));
    }
}

#[test]
fn missing_folder_is_a_clear_error() {
    let err = ClipTokenizer::from_dir(fixtures().join("no-such-dir")).unwrap_err();
    assert!(matches!(err, TokenizerError::MissingFiles { .. }), "{err}");
    assert!(err.to_string().contains("no-such-dir"));
}
